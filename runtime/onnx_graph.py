"""Rewrite of optimum's decoder-with-past graph into one with a fused, in-place attention per layer.

Optimum's export computes attention from about a hundred small nodes per layer (shape arithmetic, rotary
embedding by slicing and concatenation, the causal mask, a Concat that copies the whole past into a new present
tensor every step). onnxruntime runs each node with a fixed overhead, which for a small model costs more than the
arithmetic. Here, each layer's attention (from the outputs of the q, k and v projections to the input of the
o projection) becomes one ``com.microsoft.GroupQueryAttention`` node, onnxruntime's own fused kernel: rotary
embedding inside it from precomputed cos/sin tables, causal attention over the cached keys, and the new keys and
values written in place into a cache buffer sized for the whole context (past and present bound to the same
memory). The projections, norms and MLP are kept exactly as exported, so quantized exports are rewritten the same
way. What no longer feeds an output (the mask, the position arithmetic) is dropped.

The rewrite needs the ``onnx`` package and a graph whose node names follow the PyTorch module paths
(``/model/layers.{i}/self_attn/q_proj/...``), as optimum's export writes them. When either is missing, or the
model's rotary embedding is of a kind computed here differently, :func:`fuse_attention` says why and the backend
runs the graph as exported.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Names of the rewritten graph's new inputs (GroupQueryAttention's, see onnxruntime's contrib operator docs).
SEQLENS_K = "seqlens_k"  # int32 [batch]: tokens in the cache after this run, minus one
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar: tokens in the cache after this run
COS_CACHE = "edgedistill_rotary_cos"
SIN_CACHE = "edgedistill_rotary_sin"
CACHE_LENGTH_DIM = "cache_length"
MS_DOMAIN = "com.microsoft"
# Graph inputs the fused graph may keep; anything else still in use means the rewrite missed a consumer.
KEPT_INPUTS = ("input_ids",)
PAST = "past_key_values.{layer}.{kind}"
PRESENT = "present.{layer}.{kind}"
# Rotary embeddings computed here; others (llama3, yarn, dynamic) keep the exported graph.
SUPPORTED_ROPE = ("default", "linear")
# Operators that onnxruntime's quantizers put in front of a quantized projection, fed by the float activation.
QUANTIZE_OPS = ("DynamicQuantizeLinear",)
# A serialized model must stay under protobuf's 2 GiB message limit.
MAX_SERIALIZED_BYTES = 2**31 - 1


@dataclass(frozen=True)
class FusedGraph:
    """The result of :func:`fuse_attention`.

    Attributes:
        model: the serialized rewritten model, or None when the rewrite was not possible.
        reason: why not (empty when it worked).
        layers: decoder layers rewritten.
    """

    model: bytes | None
    reason: str = ""
    layers: int = 0


def rotary_tables(config: dict[str, Any], head_dim: int, positions: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Cos and sin tables ``[positions, head_dim / 2]`` of Llama's rotary embedding, as Hugging Face computes them.

    ``inv_freq = 1 / theta ** (arange(0, d, 2) / d)``, divided by the factor of linear scaling; the angle of position
    p is ``p * inv_freq``.
    """
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {}
    factor = float(scaling.get("factor", 1.0)) if scaling.get("rope_type", scaling.get("type")) == "linear" else 1.0
    # float32 arithmetic in the order Hugging Face uses, so that the tables agree with the exported graph's.
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)) / np.float32(factor)
    angles = np.outer(np.arange(positions, dtype=np.float32), inv_freq.astype(np.float32))
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def _unsupported(config: dict[str, Any]) -> str:
    """Why this config's attention is not one GroupQueryAttention computes as the exported graph does ('' if it is)."""
    if config.get("model_type") != "llama":
        return f"model_type {config.get('model_type')!r} (the rewrite knows llama)"
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE:
        return f"rope_scaling type {kind!r}"
    if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
        return "partial rotary embedding"
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)
    if head_dim % 16:
        return f"head size {head_dim} (onnxruntime's CPU GroupQueryAttention needs a multiple of 16)"
    return ""


def fuse_attention(model_file: Path, config: dict[str, Any], positions: int) -> FusedGraph:
    """Rewrite an optimum decoder-with-past so that each layer's attention is one in-place GroupQueryAttention.

    Args:
        model_file: the exported ``model.onnx``.
        config: its ``config.json`` (heads, head dimension, rotary settings).
        positions: the longest context the rotary tables must cover.

    Returns:
        The serialized rewritten model, or None with the reason.
    """
    if importlib.util.find_spec("onnx") is None:
        return FusedGraph(None, "the onnx package is not installed")
    reason = _unsupported(config)
    if reason:
        return FusedGraph(None, reason)
    import onnx

    try:
        model = onnx.load(str(model_file))
    except Exception as err:  # onnx raises protobuf's DecodeError and others on a broken file
        return FusedGraph(None, f"onnx cannot read the file ({type(err).__name__})")
    graph = model.graph
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    layers = int(config["num_hidden_layers"])

    # Decide the edits: per layer the attention and the gate/up pair, then every norm that follows a residual sum.
    rewrite = _Rewrite(graph)
    for layer in range(layers):
        if not rewrite.fuse_attention(layer, heads, kv_heads):
            return FusedGraph(None, f"layer {layer}'s attention does not have the structure optimum exports")
        rewrite.pack_gate_up(layer)
    epsilon = float(config.get("rms_norm_eps", 1e-6))
    norms = [
        f"/model/layers.{i}/{name}/" for i in range(layers) for name in ("input_layernorm", "post_attention_layernorm")
    ]
    for scope in [*norms, "/model/norm/"]:
        rewrite.fuse_norm(scope, epsilon)

    # Apply them, if what is left of the graph still reads only what the runtime feeds.
    nodes, needed = rewrite.nodes_feeding_outputs()
    dtype, reason = _cache_dtype(graph)
    if dtype is None:
        return FusedGraph(None, reason)
    inputs = [i for i in graph.input if i.name in needed]
    stray = [i.name for i in inputs if i.name not in KEPT_INPUTS and not i.name.startswith("past_key_values.")]
    if stray:
        return FusedGraph(None, f"inputs {', '.join(stray)} are still used after the rewrite")
    _install(model, nodes, inputs, rewrite.new_weights, needed, rotary_tables(config, head_dim, positions, dtype))
    if model.ByteSize() > MAX_SERIALIZED_BYTES:
        return FusedGraph(None, "the model is larger than one protobuf message may be")
    return FusedGraph(model.SerializeToString(), "", layers)


class _Rewrite:
    """An exported graph indexed for the rewrite, and the edits decided on so far.

    The graph itself is not changed until :func:`_install`, so the indexes (which tensor each node produces and
    reads, the initializers) hold throughout. Nodes are keyed by ``id``: protobuf messages are not hashable.
    """

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.producer = {output: node for node in graph.node for output in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.weights = {tensor.name: tensor for tensor in graph.initializer}
        self.new_weights: list[Any] = []
        self.dropped: set[int] = set()  # nodes whose outputs the new nodes produce
        self.replaced: dict[int, list[Any]] = {}  # id of a node -> the nodes emitted in its place

    # ------------------------------------------------------------------------------------------------- queries

    def constant(self, name: str) -> str | None:
        """The initializer a tensor is, directly or through an Identity (the exporter shares equal weights)."""
        if name in self.weights:
            return name
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity" and node.input[0] in self.weights:
            return node.input[0]
        return None

    def scope_output(self, scope: str) -> str | None:
        """The one tensor a module's nodes hand to nodes outside it (a projection's result)."""
        found = {
            output
            for node in self.graph.node
            if node.name.startswith(scope)
            for output in node.output
            if any(not user.name.startswith(scope) for user in self.consumers.get(output, []))
        }
        return found.pop() if len(found) == 1 else None

    def scope_input(self, scope: str) -> str | None:
        """The one tensor computed outside a module that its nodes read (the o projection's input)."""
        producer = self.producer
        found = {
            name
            for node in self.graph.node
            if node.name.startswith(scope)
            for name in node.input
            if name in producer and not producer[name].name.startswith(scope) and self.constant(name) is None
        }
        sources = {id(producer[name]) for name in found}
        if len(found) > 1 and len(sources) == 1:
            # Dynamic int8 quantization puts a DynamicQuantizeLinear, named after its input tensor, in front of
            # the projection: its one input is what the attention computed.
            quantizer = producer[next(iter(found))]
            if quantizer.op_type in QUANTIZE_OPS and len(quantizer.input) == 1:
                return quantizer.input[0]
        return found.pop() if len(found) == 1 else None

    # --------------------------------------------------------------------------------------------------- edits

    def fuse_attention(self, layer: int, heads: int, kv_heads: int) -> bool:
        """Replace the layer's attention, from the q, k and v projections' outputs to the o projection's input, by
        one GroupQueryAttention writing the cache in place; False when the layer is not shaped as optimum exports."""
        from onnx import helper

        producer = self.producer
        scope = f"/model/layers.{layer}/self_attn/"
        q, k, v = (self.scope_output(f"{scope}{name}_proj/") for name in ("q", "k", "v"))
        o_input = self.scope_input(f"{scope}o_proj/")
        past = [PAST.format(layer=layer, kind=kind) for kind in ("key", "value")]
        present = [PRESENT.format(layer=layer, kind=kind) for kind in ("key", "value")]
        if None in (q, k, v, o_input) or any(name not in producer for name in present):
            return False
        self.dropped.update(id(producer[name]) for name in present)
        # Float projections of the same input become one MatMul whose output GroupQueryAttention splits itself.
        packed = _pack_matmuls([producer[q], producer[k], producer[v]], self.weights, f"{scope}qkv_proj")
        if packed is not None:
            node, weight = packed
            self.replaced[id(producer[q])] = [node]
            self.new_weights.append(weight)
            q, k, v = node.output[0], "", ""
        self.replaced[id(producer[o_input])] = [
            helper.make_node(
                "GroupQueryAttention",
                [q, k, v, *past, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, COS_CACHE, SIN_CACHE],
                [o_input, *present],
                name=f"{scope}GroupQueryAttention",
                domain=MS_DOMAIN,
                num_heads=heads,
                kv_num_heads=kv_heads,
                do_rotary=1,
                rotary_interleaved=0,  # Hugging Face's Llama rotates the halves (i, i + d/2)
                local_window_size=-1,
            )
        ]
        return True

    def pack_gate_up(self, layer: int) -> None:
        """The MLP's gate and up projections as one MatMul, split back into the two tensors the rest reads (float
        projections only; otherwise nothing changes)."""
        from onnx import helper, numpy_helper

        producer = self.producer
        mlp = f"/model/layers.{layer}/mlp/"
        gate, up = self.scope_output(f"{mlp}gate_proj/"), self.scope_output(f"{mlp}up_proj/")
        if gate is None or up is None:
            return
        packed = _pack_matmuls([producer[gate], producer[up]], self.weights, f"{mlp}gate_up_proj")
        if packed is None:
            return
        node, weight = packed
        widths = [int(self.weights[producer[name].input[1]].dims[1]) for name in (gate, up)]
        sizes = numpy_helper.from_array(np.array(widths, dtype=np.int64), f"{mlp}gate_up_proj.split")
        split = helper.make_node("Split", [node.output[0], sizes.name], [gate, up], f"{mlp}gate_up_proj/Split", axis=-1)
        self.replaced[id(producer[gate])] = [node, split]
        self.dropped.add(id(producer[up]))
        self.new_weights.extend([weight, sizes])

    def fuse_norm(self, scope: str, epsilon: float) -> None:
        """An RMSNorm that reads a residual sum as one SkipSimplifiedLayerNormalization that also computes the sum
        (its fourth output), in place of the Add; other norms stay as they are."""
        from onnx import helper

        source = self.scope_input(scope)
        # The norm's result is what its weight multiplies; other tensors may leave the scope too (the exporter reuses
        # the norm's input cast for the residual branch).
        scaling = [
            (node, gamma)
            for node in self.graph.node
            if node.name.startswith(scope) and node.op_type == "Mul"
            for gamma in map(self.constant, node.input)
            if gamma is not None and len(self.weights[gamma].dims) == 1
        ]
        if len(scaling) != 1:
            return
        result, gamma = scaling[0][0].output[0], scaling[0][1]
        add = self.producer.get(source) if source is not None else None
        if add is None or add.op_type != "Add" or id(add) in self.replaced:
            return
        if any(name in self.weights or name not in self.producer or not name for name in add.input):
            return
        self.replaced[id(add)] = [
            helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [add.input[0], add.input[1], gamma],
                [result, "", "", add.output[0]],
                name=f"{scope}SkipSimplifiedLayerNormalization",
                domain=MS_DOMAIN,
                epsilon=epsilon,
            )
        ]
        self.dropped.add(id(self.producer[result]))

    def nodes_feeding_outputs(self) -> tuple[list[Any], set[str]]:
        """The rewritten node list, pruned to what still feeds a graph output, and the tensors those nodes read.

        New nodes take the places of nodes they replace, which keeps the order topological; the old attention, the
        mask and the position arithmetic fall away.
        """
        graph = self.graph
        nodes = [
            new for node in graph.node if id(node) not in self.dropped for new in self.replaced.get(id(node), [node])
        ]
        needed = {output.name for output in graph.output}
        kept = []
        for node in reversed(nodes):
            if any(output in needed for output in node.output):
                kept.append(node)
                needed.update(name for name in node.input if name)
        kept.reverse()
        return kept, needed


def _cache_dtype(graph: Any) -> tuple[Any, str]:
    """The numpy type of the cache inputs (the rotary tables take it), or None and why the rewrite cannot use it."""
    from onnx import TensorProto

    cache_input = next((i for i in graph.input if i.name == PAST.format(layer=0, kind="key")), None)
    if cache_input is None:
        return None, "no past_key_values inputs"
    elem_type = cache_input.type.tensor_type.elem_type
    dtype = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}.get(elem_type)
    return dtype, "" if dtype is not None else f"cache element type {elem_type}"


def _install(
    model: Any,
    nodes: list[Any],
    inputs: list[Any],
    new_weights: list[Any],
    needed: set[str],
    rotary: tuple[np.ndarray, np.ndarray],
) -> None:
    """Put the rewritten nodes into ``model``: cache inputs and outputs sized ``cache_length``, GroupQueryAttention's
    two length inputs added, only the initializers still read kept (the new ones included), the rotary tables added."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    graph.initializer.extend(new_weights)
    del graph.node[:]
    graph.node.extend(nodes)
    for value in list(inputs) + [o for o in graph.output if o.name.startswith("present.")]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[2].dim_param = CACHE_LENGTH_DIM
    del graph.input[:]
    graph.input.extend(inputs)
    graph.input.extend(
        [
            helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch_size"]),
            helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
        ]
    )
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    cos, sin = rotary
    graph.initializer.extend([numpy_helper.from_array(cos, COS_CACHE), numpy_helper.from_array(sin, SIN_CACHE)])
    # Intermediate shapes recorded by the exporter may no longer hold; onnxruntime infers them again.
    del graph.value_info[:]
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _pack_matmuls(nodes: list[Any], weights: dict[str, Any], name: str) -> tuple[Any, Any] | None:
    """One MatMul for several float MatMuls that read the same input: weights concatenated along the output axis.

    Returns the new node and its weight, or None when the nodes are not all plain MatMuls of one input with
    two-dimensional float initializers (quantized projections stay as they are).
    """
    from onnx import TensorProto, helper, numpy_helper

    if any(node.op_type != "MatMul" or len(node.input) != 2 for node in nodes):
        return None
    if len({node.input[0] for node in nodes}) != 1 or any(node.input[1] not in weights for node in nodes):
        return None
    tensors = [weights[node.input[1]] for node in nodes]
    if any(t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or len(t.dims) != 2 for t in tensors):
        return None
    arrays = [numpy_helper.to_array(t) for t in tensors]
    if len({(a.shape[0], a.dtype) for a in arrays}) != 1:
        return None
    weight = numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{name}.weight")
    node = helper.make_node("MatMul", [nodes[0].input[0], weight.name], [f"{name}/MatMul_output_0"], f"{name}/MatMul")
    return node, weight
