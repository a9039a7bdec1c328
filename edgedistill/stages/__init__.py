"""The pipeline's stages, one module each, walked in order by :func:`edgedistill.pipeline.run_pipeline`.

``base``      what a stage is (settings, outputs, record, run, report part) and what it is given (:class:`Upstream`)
``teacher``   the teacher cache, its held-out perplexity and the held-out text
``distill``   every student twice: distilled and CE only
``export``    the teacher and the distilled students to GGUF and ONNX, checked against PyTorch
``bench``     every artifact measured on this host, with projections and the seed's claims
``report``    sample generations, then report.md from every stage's sections
``registry``  the default order (:data:`DEFAULT`) and the pipeline config assembled from the stages' settings
"""

from edgedistill.stages.base import Layout, PipelineSettings, Record, RunSettings, Section, Stage, Upstream
from edgedistill.stages.registry import DEFAULT, Registry

__all__ = ["DEFAULT", "Layout", "PipelineSettings", "Record", "Registry", "RunSettings", "Section", "Stage", "Upstream"]
