"""The seed's distillation methods compared on one budget: the same student, from the same pruned initialisation,
trained on the same number of tokens with each method, measured on the same text.

    python -m edgedistill.bench.methods [--teacher smollm2-135m] [--student tiny] [--steps 16] [--batch-size 4]
        [--seq-len 256] [--data FILE ...] [--methods kd,feature,...] [--out runs/methods] [--threads 0]

Methods (``--methods``, default all, in this order):

* ``kd``: logit KD, the baseline (alpha 0.5 CE + forward KL at T 1, the teacher online);
* ``feature``: + feature distillation (cosine of hidden states through learned projections, the layers the
  pruning kept);
* ``attention``: + MiniLMv2 attention relations on the last layer;
* ``sequence``: the same KD on the teacher's own answers to the default prompt set (``edgedistill teacher-data``,
  up to 128 tokens an answer, generated first: its seconds count in the row's wall time);
* ``on-policy``: GKD, half the batches sampled by the student and scored by the teacher;
* ``progressive``: a schedule: the lower layers' features, then every matched layer's, then logits;
* ``multi-stage``: a schedule: the embedded Python documentation first (general), then the task: the chat answers,
  or ``--data`` when given;
* ``chain``: through a teacher assistant: ``small`` is derived from the teacher and distilled with the same
  budget, the student is derived from it (its extra cost is in the row's wall time).

Every run: the student preset derived from the teacher by ``edgedistill prune`` once (``chain`` excepted; candidate
shapes ranked after :data:`PROBE_STEPS` distillation steps),
``--steps`` x ``--batch-size`` x 256 tokens, lr 1.5e-3 with 4 warm-up steps, embeddings frozen, seed 0, the teacher
online (feature and attention losses need its hidden states; the baseline uses it too so that only the method
differs). Each run is its own ``edgedistill distill`` process, so its wall time and peak RSS are its own.

Measured afterwards, the same way for every student, on the same text: bits per byte on the corpus's held-out split
(the pipeline's) and on ``outside.jsonl`` (English the students never saw), top-1 agreement with the teacher and
forward KL to it on the held-out split (the teacher's signal computed once). Written to ``OUT/methods.json``,
``methods.csv``, ``methods.md`` and ``methods.png``; the last line of stdout is the JSON document.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgeDistillError

LR = 1.5e-3
# Candidate shapes ranked after this many distillation steps, not by zero-shot loss: at 1/8 of SmolLM2 the zero-shot
# ranking chose 96 wide x 30 layers, which 24 steps of every method left predicting one token (9.4 % agreement).
PROBE_STEPS = 4
WARMUP = 4
HELDOUT_TOKENS = 8192
EVAL_BATCH = 4


@dataclass(frozen=True)
class Method:
    summary: str
    settings: dict[str, Any] = field(default_factory=dict)  # distill settings on top of the baseline's


METHODS: dict[str, Method] = {
    "kd": Method("logit KD (baseline): alpha 0.5, forward KL, T 1"),
    # cosine: SmolLM2's hidden states carry channels in the thousands, so an MSE at weight 1 swamps CE and KD
    "feature": Method(
        "+ feature distillation (cosine, pruning's layers)", {"feature_weight": 1.0, "feature_loss": "cosine"}
    ),
    "attention": Method("+ attention relations (MiniLMv2, last layer)", {"attention_weight": 1.0}),
    "sequence": Method("logit KD on the teacher's own answers (sequence-level)"),
    "on-policy": Method("on-policy (GKD): half the batches sampled by the student", {"on_policy_fraction": 0.5}),
    "progressive": Method("schedule: lower layers' features, all layers' features, logits"),
    "multi-stage": Method("schedule: documentation (general), then chat answers (task)"),
    "chain": Method("through a teacher assistant: teacher -> small -> student"),
}


@dataclass
class Row:
    method: str
    summary: str
    heldout_bpb: float
    outside_bpb: float
    top1_agreement: float
    kd_to_teacher: float
    top1_accuracy: float
    seconds: float  # wall time of the method: its distill process, plus what it alone needed first
    train_seconds: float  # the distill process alone
    peak_rss_mb: float  # the largest of its processes
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ processes
def _edgedistill(args: list[str], what: str) -> tuple[float, float]:
    """Run ``python -m edgedistill ARGS``; (seconds, peak RSS MB). A failure stops the bench, naming ``what``."""
    from edgedistill.bench.rss import run_with_peak_rss

    started = time.perf_counter()
    code, peak_mb, stderr = run_with_peak_rss([sys.executable, "-m", "edgedistill", *args])
    if code:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EdgeDistillError(f"methods bench: {what} failed (exit {code}): {last}")
    return time.perf_counter() - started, peak_mb


def _write_settings(path: Path, settings: dict[str, Any]) -> Path:
    from edgedistill.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(settings, indent=1) + "\n")
    return path


def _schedule_toml(phases: list[dict[str, Any]]) -> str:
    """A ``--schedule`` file: one ``[[phase]]`` table per phase (JSON scalars and lists are TOML values)."""
    lines = []
    for phase in phases:
        lines.append("[[phase]]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in phase.items())
        lines.append("")
    return "\n".join(lines)


def _layers(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"])


# ------------------------------------------------------------------------------------------------ the bench
class MethodsBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.tokens = args.steps * args.batch_size * args.seq_len
        self.common = {
            "teacher": args.teacher,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "data": list(args.data),
            "seq_len": args.seq_len,
            "alpha": 0.5,
            "temperature": 1.0,
            "lr": LR,
            "warmup_steps": WARMUP,
            "freeze_embeddings": True,
            "seed": args.seed,
            "threads": args.threads,
            "train_tokens": self.tokens,
            "heldout_tokens": args.seq_len,  # the bench measures every student itself, on the same text
            "save_every": args.steps,
            "resume": True,
        }

    # -- preparation shared by the methods
    def derive(self, student: str, source: str, out: Path) -> tuple[float, float]:
        if (out / "prune.json").is_file():
            return 0.0, 0.0
        args = [
            "prune", source, "--teacher", self.args.teacher, "--student", student, "--out", str(out),
            "--vocab", "auto", "--probe-steps", str(PROBE_STEPS), "--calibration", "32", "--candidates", "8",
            "--threads", str(self.args.threads), "--seed", str(self.args.seed), "--seq-len", str(self.args.seq_len),
            *(["--data", *self.args.data] if self.args.data else []),
        ]  # fmt: skip
        return _edgedistill(args, f"deriving {student} from {source}")

    def distill(self, name: str, settings: dict[str, Any]) -> tuple[Path, float, float]:
        out = self.out / "runs" / name
        if (out / "train_summary.json").is_file():
            summary = json.loads((out / "train_summary.json").read_text(encoding="utf-8"))
            return out, summary.get("bench_seconds", 0.0), summary.get("bench_peak_rss_mb", 0.0)
        config = _write_settings(self.out / "configs" / f"{name}.json", dict(self.common, **settings, out=str(out)))
        seconds, peak = _edgedistill(["distill", "--config", str(config)], f"method {name}")
        summary_path = out / "train_summary.json"
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        summary.update(bench_seconds=seconds, bench_peak_rss_mb=peak)  # so that a rerun reports the same numbers
        _write_settings(summary_path, summary)
        return out, seconds, peak

    def teacher_data(self) -> tuple[Path, float, float, dict[str, Any]]:
        """The teacher's answers to the default prompt set, as chat JSONL."""
        data = self.out / "teacher-data.jsonl"
        seconds = peak = 0.0
        if not data.is_file():
            args = ["teacher-data", "--teacher", self.args.teacher, "--out", str(data), "--max-new-tokens", "128"]
            seconds, peak = _edgedistill([*args, "--threads", str(self.args.threads)], "teacher-data")
        manifest_path = data.parent / (data.name + ".manifest.json")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else {}
        return data, seconds, peak, manifest

    # -- the methods
    def run_method(self, name: str, init: Path) -> tuple[Path, float, float, float, dict[str, Any]]:
        """(student dir, method seconds, distill seconds, peak RSS MB, extra) of one method."""
        method = METHODS[name]
        settings = dict(method.settings, student=str(init))
        extra_seconds, extra_peak, extra = 0.0, 0.0, {}
        if name == "sequence":
            data, extra_seconds, extra_peak, manifest = self.teacher_data()
            settings["data"] = [str(data)]
            generation = manifest.get("generation", {})
            extra = {
                "records": manifest.get("records"),
                "tokens": generation.get("tokens"),
                "tokens_per_second": generation.get("tokens_per_second"),
                "single_sequence_tokens_per_second": manifest.get("single_sequence", {}).get("tokens_per_second"),
                "generation_seconds": round(extra_seconds, 1),
            }
        elif name in ("progressive", "multi-stage"):
            schedule = self.out / "configs" / f"{name}.toml"
            schedule.parent.mkdir(parents=True, exist_ok=True)
            from edgedistill.files import atomic_write_text

            atomic_write_text(schedule, _schedule_toml(self.phases(name, _layers(init))))
            settings["schedule"] = str(schedule)
        elif name == "chain":
            assistant = self.out / "assistant-derived"
            s1, p1 = self.derive("small", self.args.teacher, assistant)
            trained, s2, p2 = self.distill("chain-assistant", {"student": str(assistant)})
            chained = self.out / "chain-derived"
            s3, p3 = self.derive(self.args.student, str(trained), chained)
            settings["student"] = str(chained)
            extra_seconds, extra_peak = s1 + s2 + s3, max(p1, p2, p3)
            extra = {"assistant_seconds": round(s1 + s2, 1)}
        out, seconds, peak = self.distill(name, settings)
        return out, seconds + extra_seconds, seconds, max(peak, extra_peak), extra

    def phases(self, name: str, layers: int) -> list[dict[str, Any]]:
        """The phases of a schedule method; ``layers``: the student's depth (progressive's lower half)."""
        steps = self.args.steps
        if name == "progressive":
            third = steps // 3
            lower = ",".join(str(i) for i in range(max(1, layers // 2)))
            return [
                {"name": "lower-features", "steps": third, "feature_weight": 1.0, "feature_loss": "cosine",
                 "feature_layers": lower, "logit_weight": 0.0},
                {"name": "all-features", "steps": third, "feature_weight": 1.0, "feature_loss": "cosine",
                 "logit_weight": 0.0},
                {"name": "logits", "steps": steps - 2 * third},
            ]  # fmt: skip
        from edgedistill.distill.data import CHAT_CORPUS, DEFAULT_CORPUS

        general, task = str(DEFAULT_CORPUS), self.args.data or [str(CHAT_CORPUS)]
        half = steps // 2
        return [
            {"name": "general", "steps": half, "data": [general]},
            {"name": "task", "steps": steps - half, "data": list(task)},
        ]

    def run(self, names: list[str]) -> dict[str, Any]:
        started = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        init = self.out / "derived"
        derive_seconds, _ = self.derive(self.args.student, self.args.teacher, init)
        judge = Judge(self.args.teacher, self.out, self.args.threads, self.args.data, self.args.seq_len)
        rows = []
        for name in names:
            print(f"methods: {name} ({METHODS[name].summary})", file=sys.stderr, flush=True)
            out, seconds, train_seconds, peak, extra = self.run_method(name, init)
            measured = judge.measure(out)
            rows.append(Row(name, METHODS[name].summary, **measured, seconds=round(seconds, 1),
                            train_seconds=round(train_seconds, 1), peak_rss_mb=round(peak), extra=extra))  # fmt: skip
        return {
            "teacher": judge.teacher_row,
            "student": self.args.student,
            "budget": {
                "steps": self.args.steps,
                "batch_size": self.args.batch_size,
                "seq_len": self.args.seq_len,
                "tokens": self.tokens,
                "threads": self.args.threads,
            },  # fmt: skip
            "derive_seconds": round(derive_seconds, 1),
            "rows": [asdict(r) for r in rows],
            "seconds": round(time.perf_counter() - started, 1),
        }


# ------------------------------------------------------------------------------------------------ measuring
class Judge:
    """Measures every student on the same text: the held-out split (written once as text, each student tokenizes
    it) and ``outside.jsonl``; the teacher's signal on the held-out split is computed once and reused."""

    def __init__(self, teacher: str, out: Path, threads: int, data: list[str], seq_len: int) -> None:
        import torch

        from edgedistill.distill import teacher as teachers
        from edgedistill.distill.data import OUTSIDE_TEXT, load_data, load_eval_data, token_byte_lengths
        from edgedistill.distill.evaluation import evaluate
        from edgedistill.distill.heads import SupervisedLogits, resolve_dtype
        from edgedistill.files import atomic_write_text

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cpu")
        source = teachers.resolve_teacher(teacher)
        tokenizer = teachers.load_tokenizer(source)
        self.seq_len = seq_len
        _, heldout, _ = load_data(data, tokenizer, seq_len, heldout_tokens=HELDOUT_TOKENS)
        self.heldout_text = out / "heldout.jsonl"
        lines = [json.dumps({"text": tokenizer.decode(row[:-1].tolist())}) for row in heldout.ids]
        atomic_write_text(self.heldout_text, "\n".join(lines) + "\n")
        self.outside_text = OUTSIDE_TEXT
        self.teacher_ids = load_eval_data([self.heldout_text], tokenizer, self.seq_len)
        model = teachers.load_model(source, resolve_dtype("float32", self.device), self.device)
        lengths = token_byte_lengths(tokenizer)
        self.teacher_row = {
            "heldout": evaluate(model, None, self.teacher_ids, EVAL_BATCH, self.device, byte_lengths=lengths),
            "outside": evaluate(
                model, None, load_eval_data([OUTSIDE_TEXT], tokenizer, self.seq_len), EVAL_BATCH, self.device,
                byte_lengths=lengths,
            ),
        }  # fmt: skip
        from edgedistill.distill.evaluation import supervised_batch
        from edgedistill.distill.heads import teacher_signal

        head = SupervisedLogits(model).eval()
        self.signals = []  # per evaluation batch: the teacher's final hidden states and head, [N, H] and [V, H]
        for start in range(0, self.teacher_ids.num_sequences, EVAL_BATCH):
            inputs, positions, _, _ = supervised_batch(self.teacher_ids, slice(start, start + EVAL_BATCH), self.device)
            self.signals.append((inputs, teacher_signal(head, inputs, positions)))
        del model, head

    def measure(self, student_dir: Path) -> dict[str, float]:

        from edgedistill.distill.data import load_eval_data, token_byte_lengths
        from edgedistill.distill.evaluation import evaluate
        from edgedistill.distill.student import load_student_checkpoint
        from edgedistill.distill.vocab import TeacherMapper, VocabMap

        student, tokenizer = load_student_checkpoint(student_dir)
        student.float().eval()
        lengths = token_byte_lengths(tokenizer)
        vocab_map = VocabMap.load(student_dir)
        mapper = TeacherMapper(vocab_map.with_mode("renorm"), self.device) if vocab_map is not None else None
        heldout = load_eval_data([self.heldout_text], tokenizer, self.seq_len)
        in_teacher_ids = heldout.ids if vocab_map is None else vocab_map.teacher_ids[heldout.ids]
        if in_teacher_ids.shape != self.teacher_ids.ids.shape or not (in_teacher_ids == self.teacher_ids.ids).all():
            raise EdgeDistillError(
                f"methods bench: {student_dir}'s tokenizer splits the held-out text differently from the teacher's"
            )

        def teacher_for(split: str, rows: slice, inputs: Any, positions: Any) -> Any:
            signal = self.signals[rows.start // EVAL_BATCH][1]
            return mapper.signal(signal) if mapper is not None else signal

        held = evaluate(student, teacher_for, heldout, EVAL_BATCH, self.device, byte_lengths=lengths)
        outside = evaluate(
            student, None, load_eval_data([self.outside_text], tokenizer, self.seq_len), EVAL_BATCH, self.device,
            byte_lengths=lengths,
        )  # fmt: skip
        return {
            "heldout_bpb": round(held["bits_per_byte"], 4),
            "outside_bpb": round(outside["bits_per_byte"], 4),
            "top1_agreement": round(held["top1_agreement"], 4),
            "kd_to_teacher": round(held["kd_to_teacher"], 4),
            "top1_accuracy": round(held["top1_accuracy"], 4),
        }


# ------------------------------------------------------------------------------------------------ report
HEADERS = [
    "method",
    "held-out bpb",
    "vs KD",
    "outside bpb",
    "top-1 agreement",
    "KL to teacher",
    "wall s",
    "peak RSS MB",
]


def _table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = result["rows"]
    base = next((r["heldout_bpb"] for r in rows if r["method"] == "kd"), None)
    out = []
    for r in rows:
        delta = "" if base is None or r["method"] == "kd" else f"{r['heldout_bpb'] - base:+.3f}"
        out.append([
            f"{r['method']}: {r['summary']}", f"{r['heldout_bpb']:.3f}", delta, f"{r['outside_bpb']:.3f}",
            f"{100 * r['top1_agreement']:.1f} %", f"{r['kd_to_teacher']:.3f}", f"{r['seconds']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
        ])  # fmt: skip
    return out


def verdicts(result: dict[str, Any]) -> list[str]:
    """Which methods beat logit KD on held-out bits per byte at this budget, and which did not."""
    rows = result["rows"]
    base = next((r for r in rows if r["method"] == "kd"), None)
    if base is None:
        return []
    better = [r["method"] for r in rows if r["method"] != "kd" and r["heldout_bpb"] < base["heldout_bpb"]]
    worse = [r["method"] for r in rows if r["method"] != "kd" and r["heldout_bpb"] >= base["heldout_bpb"]]
    return [
        f"- Beat logit KD on held-out bits per byte at this budget: {', '.join(better) or 'none'}.",
        f"- Did not: {', '.join(worse) or 'none'}.",
    ]


def markdown(result: dict[str, Any]) -> str:
    from edgedistill.bench.report import markdown_table

    budget = result["budget"]
    teacher = result["teacher"]
    lines = [
        "# Distillation methods on one budget",
        "",
        f"Student `{result['student']}` derived from the teacher by pruning (the same initialisation for every method "
        f"but `chain`); {budget['steps']} steps x {budget['batch_size']} x {budget['seq_len']} = "
        f"{budget['tokens']:,} training tokens each; teacher online. Teacher: held-out "
        f"{teacher['heldout']['bits_per_byte']:.3f} bits/byte, outside {teacher['outside']['bits_per_byte']:.3f}. "
        "Lower bits per byte is better; wall time includes what a method alone needed first (teacher-data "
        "generation, the assistant's training).",
        "",
        markdown_table(HEADERS, _table_rows(result)),
        "",
        *verdicts(result),
        "",
    ]
    return "\n".join(lines)


def write(result: dict[str, Any], out: Path) -> None:
    from edgedistill.files import atomic_write_text

    atomic_write_text(out / "methods.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "methods.md", markdown(result))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    keys = [k for k in result["rows"][0] if k != "extra"] if result["rows"] else []
    writer.writerow(keys)
    writer.writerows([[r[k] for k in keys] for r in result["rows"]])
    atomic_write_text(out / "methods.csv", buffer.getvalue())
    _plot(result, out / "methods.png")


def _plot(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from edgedistill.files import atomic_open

    rows = result["rows"]
    names = [r["method"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.barh(names, [r["heldout_bpb"] for r in rows], color="tab:blue", label="held-out")
    left.barh(names, [r["outside_bpb"] for r in rows], color="tab:orange", alpha=0.35, label="outside")
    left.axvline(result["teacher"]["heldout"]["bits_per_byte"], color="k", linestyle=":", label="teacher held-out")
    left.set_xlabel("bits per byte (lower is better)")
    left.legend(loc="lower right", fontsize=8)
    left.invert_yaxis()
    right.scatter([r["seconds"] for r in rows], [r["heldout_bpb"] for r in rows])
    for r in rows:
        right.annotate(r["method"], (r["seconds"], r["heldout_bpb"]), fontsize=8)
    right.set_xlabel("wall seconds")
    right.set_ylabel("held-out bits per byte")
    figure.tight_layout()
    with atomic_open(path) as stream:
        figure.savefig(stream, format="png", dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------ command
def parse_methods(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise EdgeDistillError(f"--methods: expected names from {', '.join(METHODS)}, got {text!r}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--student", default="tiny", help="the preset every method trains (default tiny)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--data", nargs="*", default=[], help="training data (default: the embedded corpus)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all)")
    parser.add_argument("--out", default="runs/methods")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        names = parse_methods(args.methods)
        if args.steps < 3 or args.batch_size < 1 or args.seq_len < 2:
            raise EdgeDistillError(
                "--steps: expected at least 3 (the schedules have three phases); --batch-size >= 1; --seq-len >= 2"
            )
        result = MethodsBench(args).run(names)
        write(result, Path(args.out))
    except EdgeDistillError as err:
        print(f"edgedistill: error: {err}", file=sys.stderr)
        return 2
    except (subprocess.SubprocessError, OSError) as err:
        print(f"edgedistill: error: methods bench: {err}", file=sys.stderr)
        return 2
    print(markdown(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
