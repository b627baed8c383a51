"""The options of a prune: one typed object that the CLI's flags and the Python API are both made from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PruneConfig:
    """Options of `moeprune prune`; the CLI flags are generated from these fields."""
    model: str | None = field(default=None, metadata={"help": "model name or path (default: demo-mixtral)"})
    method: str | None = field(default=None, metadata={
        "help": "pruning method, see `moeprune methods`; or auto: plan diverse, naee, reap and frequency from the text "
                "and from text + self-written statistics and write the plan held-out windows prefer (default: auto "
                "when there is calibration text to hold some of out and no --stats-cache, --report-tradeoff or method "
                "option; else diverse)"})
    keep: int | None = field(default=None, metadata={"help": "routed experts to keep per MoE layer"})
    ratio: float | None = field(default=None, metadata={"help": "fraction of routed experts to keep (instead of --keep)"})
    out: str | None = field(default=None, metadata={"help": "output folder for the pruned checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out folder"})
    calib: str | None = field(default=None, metadata={
        "help": "calibration text: demo, demo:DOMAINS, a .txt/.jsonl file or folder, hf:NAME[:CONFIG][:SPLIT], "
                "random (default: demo when the model has a tokenizer, else random)"})
    samples: int = field(default=64, metadata={"help": "calibration sequences"})
    self_calib: float | None = field(default=None, metadata={
        "help": "share of the calibration sequences the model writes itself, sampled from it (seeded): they cover the "
                "domains the model serves that the calibration text lacks; 0: the text alone, 1: no text "
                "(default: 0.5 when the whole model fits in memory, else 0)"})
    self_text: str | None = field(default=None, metadata={
        "help": "text the model wrote elsewhere, for a model too large to sample from here (a .txt/.jsonl file "
                "or folder; `moeprune sample` makes one with vLLM): the --self-calib share is cut from it"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    seed: int = field(default=0, metadata={"help": "seed for calibration sampling and seeded methods"})
    sample_tokens: int = field(default=512, metadata={"help": "tokens per layer on which every expert is run"})
    batch_size: int = field(default=8, metadata={"help": "calibration batch size"})
    plan: str | None = field(default=None, metadata={"help": "apply this plan.json instead of planning"})
    plan_out: str | None = field(default=None, metadata={"help": "also write the plan to this file"})
    stats_cache: str | None = field(default=None, metadata={"help": "folder to save/reuse calibration statistics"})
    dtype: str = field(default="auto", metadata={"help": "dtype to compute and save in: float32, bfloat16, float16; "
                                                          "auto: float32 on the CPU, saved in the checkpoint's dtype"})
    device: str = field(default="auto", metadata={"help": "torch device, e.g. cpu or cuda (auto: the GPU if any)"})
    no_eval: bool = field(default=False, metadata={"help": "skip the before/after evaluation"})
    eval_domains: str | None = field(default=None, metadata={
        "help": "comma-separated evaluation texts: demo domain names, .txt/.jsonl files, NAME=PATH "
                "(default: the demo held-out shards)"})
    eval_tasks: str | None = field(default=None, metadata={
        "help": "comma-separated multiple-choice tasks: demo task names or .jsonl files (default: the demo tasks)"})
    eval_max_tokens: int | None = field(default=16384, metadata={"help": "evaluation tokens per domain (0: all)"})
    eval_limit: int | None = field(default=100, metadata={"help": "questions per multiple-choice task (0: all)"})
    report_tradeoff: bool = field(default=False, metadata={
        "help": "also plan the strongest alternatives from the same statistics, score each on a held-out fifth of the "
                "calibration text per domain and print the trade-off (the --method plan is written; the others are "
                "saved under tradeoff/ for --plan)"})
    tradeoff_tokens: int = field(default=4096, metadata={"help": "held-out tokens per domain for --report-tradeoff"})
    dequantize: bool = field(default=False, metadata={
        "help": "write a quantized (FP8 / MXFP4) input's output in bf16 without its quantization_config (default: "
                "the input's precision: kept experts' bytes copied, merged experts quantized again)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bars"})
