"""``/classify`` latency, throughput and adapter hot-swap of a real ``nli-serve`` on loopback.

    python -m bench.classify_latency [--model smollm2|qwen2-1.5b|FOLDER] [--device auto|cpu|cuda]
        [--data FILE] [--requests 200] [--clients 64] [--duration 10] [--swaps 5]
        [--swap-cycles 10] [--max-batch-size N] [--max-batch-wait-ms MS] [--env NLI_X=V]
        [--out result.json] [--server-log server.log]

Makes random LoRA adapters (r=16 on all linear layers, ``init_lora_weights=False``, like
``tests/app/helpers.make_adapter``) for the base model in a temporary adapters dir, starts
``nli-serve`` (``python -m app.cli``) on 127.0.0.1 with the adapter ``bench-a`` as default
(``--default-adapter``), waits
for ``/ready`` and measures, in this order:

1. ``one_client``: ``--requests`` sequential ``POST /classify`` calls (keep-alive) after
   ``--warmup`` calls: p50/p99 latency.
2. ``load``: ``--clients`` closed-loop clients for ``--duration`` s after a warm-up second:
   requests/s, p50/p99, errors.
3. ``hot_swap``: ``--swaps`` times, ``POST /adapters`` of an adapter not loaded yet, then the
   first ``POST /classify`` that names it (the "adapter load plus first use" of issue 6), then
   a second one (steady state), then ``DELETE``.
4. ``swaps_under_load``: ``--clients`` clients asking for the default adapter, ``bench-b`` and
   ``base`` while this process loads an adapter, makes it the default, switches back and
   unloads it, ``--swap-cycles`` times. Failed requests must be 0; every answer is also checked
   against a sequential reference score of the adapter that answered it.

Prints a table and one JSON line; ``--out`` writes the JSON. Client processes: see
``bench.load_clients``. The server runs without its access log unless ``--access-log``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from app.serving_stack import serving_stack
from bench.common import (
    DEFAULT_DATA,
    MODEL_CHOICES,
    REPO_ROOT,
    git_commit,
    latency_summary,
    machine,
    read_pairs,
    resolve_model,
)
from bench.load_clients import LoadResult, run_load

RANDOM_DEFAULT = "bench-a"
OTHER_ADAPTER = "bench-b"


# -- adapters ---------------------------------------------------------------------------------


def make_adapters(
    base_model: str,
    root: Path,
    seeds: dict[str, int],
    *,
    rank: int,
    alpha: int,
    dtype: str,
    quantization: str,
) -> dict[str, float]:
    """Save one random LoRA adapter per ``{name: seed}`` under ``root``, with its manifest, and
    return where the time went (``imports_s``; ``setup_s``: those, the config, the tokenizer and
    the model's skeleton; ``adapters_s``: making and saving the adapters).

    Random adapters need the base's shapes, not its weights: the model is built from its config
    on the meta device and given uninitialised CPU storage that nothing reads, so no weights are
    loaded (the Qwen2-1.5B shape's 3 GB included) and no GPU memory is taken from the server.
    The LoRA weights are PEFT's own random initialisation, saved by PEFT in float32 as a trained
    adapter is. The manifest carries the base's identity and the server's quantization.
    """
    started = time.perf_counter()
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from nli.labels import LABELS
    from nli.loading import load_tokenizer, resolve_base_model
    from nli.manifest import WEIGHTS_FILE, AdapterManifest, write_manifest
    from nli.prompt import CURRENT_PROMPT_FORMAT
    from nli.scoring import label_tokens

    imports_s = time.perf_counter() - started
    source, ref = resolve_base_model(base_model)
    ids = [list(seq) for seq in label_tokens(load_tokenizer(source)).sequences]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(source), dtype=torch.bfloat16
        )
    model.to_empty(device="cpu")  # address space only: these pages are never touched
    setup_s = time.perf_counter() - started
    for name, seed in seeds.items():
        folder = root / name
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules="all-linear", init_lora_weights=False
        )
        peft_model = get_peft_model(model, config)
        peft_model.save_pretrained(str(folder))
        model = peft_model.unload()
        if dtype == "bf16":  # as bench/pack_adapter.py stores the shipped adapter
            tensors = load_file(str(folder / WEIGHTS_FILE))
            tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
            save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        manifest = AdapterManifest(
            base_model=ref.name,
            base_model_fingerprint=ref.fingerprint,
            quantization=quantization,
            prompt_format=CURRENT_PROMPT_FORMAT,
            label_words=list(LABELS),
            label_token_ids=ids,
            lora={"r": rank, "alpha": alpha, "target_modules": "all-linear"},
            training_data={"source": "random benchmark adapter", "seed": seed},
        )
        write_manifest(folder, manifest)
    return {
        "imports_s": round(imports_s, 1),
        "setup_s": round(setup_s, 1),
        "adapters_s": round(time.perf_counter() - started - setup_s, 1),
    }


def adapter_seeds(swaps: int) -> dict[str, int]:
    """``{name: seed}`` of the random adapters a run needs: the default, ``bench-b`` and the
    hot-swap ones (at least two, which the swaps under load use)."""
    swap_names = [f"swap-{i}" for i in range(max(swaps, 2))]
    return {RANDOM_DEFAULT: 1, OTHER_ADAPTER: 2, **{n: 10 + i for i, n in enumerate(swap_names)}}


def ensure_adapters(args: argparse.Namespace, base_model: str, root: Path) -> dict[str, float]:
    """Make the adapters of ``adapter_seeds`` missing from ``root``; ``make_adapters``' timings,
    or an empty dict when none was missing. An adapter counts as made once its manifest, written
    last, is there (a run cut short while making one makes it again)."""
    from nli.manifest import MANIFEST_FILE

    root.mkdir(parents=True, exist_ok=True)
    seeds = adapter_seeds(args.swaps)
    missing = {n: seed for n, seed in seeds.items() if not (root / n / MANIFEST_FILE).is_file()}
    if not missing:
        return {}
    return make_adapters(
        base_model, root, missing, rank=args.rank, alpha=args.alpha,
        dtype=args.adapter_dtype, quantization=args.quantization,
    )  # fmt: skip


def prepare_adapters(*argv: str) -> Path:
    """Make, ahead of time, the adapters a later run with these arguments (``--adapters-dir``
    included) will find: ``bench/run_gpu.sh`` does this in its ``prepare`` step, whose process
    has imported torch and transformers already, so the classify steps do not pay those imports
    again before their servers can start."""
    args = build_parser().parse_args(list(argv))
    if args.adapters_dir is None:
        raise SystemExit("prepare_adapters needs --adapters-dir")
    ensure_adapters(args, resolve_model(args.model), args.adapters_dir)
    return args.adapters_dir


# -- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(env: dict[str, str], port: int, log: Path, access_log: bool) -> Any:
    args = [sys.executable, "-m", "app.cli", "--host", "127.0.0.1", "--port", str(port)]
    if not access_log:
        args.append("--no-access-log")
    with open(log, "ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT)


def wait_ready(url: str, process: Any, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with code {process.returncode} (see its log)")
        try:
            response = httpx.get(f"{url}/ready", timeout=5.0)
            if response.status_code == 200:
                return dict(response.json())
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout:.0f} s")


def wait_graphs(url: str, *, quiet_s: float = 1.0, timeout: float = 120.0) -> int:
    """Wait until the server's CUDA graphs ahead of traffic are recorded (the count in /ready
    unchanged for ``quiet_s``), so that no measurement shares the GPU with a recording."""
    deadline = time.monotonic() + timeout
    count, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = int(httpx.get(f"{url}/ready", timeout=5.0).json().get("cuda_graphs_recorded", 0))
        if now != count:
            count, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.1)
    return count


def stop_server(process: Any, timeout: float = 60.0) -> int | str:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return "killed"
    return int(process.returncode)


_PASSES, _REQUESTS = "nli_batch_requests_count", "nli_batch_requests_sum"
_PHASE = re.compile(r'nli_engine_seconds_total\{phase="(\w+)"\}')
_GC = re.compile(r'nli_gc_pause_seconds_(count|sum)\{generation="(\d)"\}')


def batch_counters(url: str) -> dict[str, float] | None:
    """Forward passes, requests scored, the worker's seconds by phase (``nli_engine_seconds``)
    and garbage-collector pauses (``gc<N>_count`` / ``gc<N>_sum``) so far, from ``/metrics``;
    None if unavailable."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        phase = _PHASE.fullmatch(name)
        gc = _GC.fullmatch(name)
        if name in (_PASSES, _REQUESTS):
            values[name] = float(rest)
        elif phase:
            values[phase.group(1)] = float(rest)
        elif gc:
            values[f"gc{gc.group(2)}_{gc.group(1)}"] = float(rest)
    if _PASSES not in values or _REQUESTS not in values:
        return None
    return values


def batching_between(
    before: dict[str, float] | None, after: dict[str, float] | None
) -> dict[str, Any] | None:
    """Forward passes, mean requests per pass, the worker's milliseconds per pass by phase, and
    the garbage collections by generation (how many, and their milliseconds in all) between two
    ``batch_counters`` readings."""
    if before is None or after is None or after[_PASSES] <= before[_PASSES]:
        return None
    passes = after[_PASSES] - before[_PASSES]

    def delta(key: str) -> float:
        return after[key] - before[key]

    phases = [k for k in after if k in before and k not in (_PASSES, _REQUESTS)]
    gc_counts = sorted(k for k in phases if k.startswith("gc") and k.endswith("_count"))
    return {
        "forward_passes": passes,
        "mean_requests_per_pass": round(delta(_REQUESTS) / passes, 2),
        "worker_ms_per_pass": {
            k: round(1000 * delta(k) / passes, 2) for k in sorted(phases) if not k.startswith("gc")
        },
        "gc": {
            k.removesuffix("_count"): {
                "collections": int(delta(k)),
                "ms": round(1000 * delta(k.replace("_count", "_sum")), 1),
            }
            for k in gc_counts
        },
    }


# -- phases -----------------------------------------------------------------------------------


class DirectScorer:
    """``NLIClassifier.score_pairs`` on one pair in this process: no HTTP, no queue.

    The gap to ``one_client`` is what the service adds (HTTP, validation, batching worker).
    Loading is separate from measuring so that the model loads while the server starts; the
    measurement waits until the server is ready and idle.
    """

    def __init__(
        self,
        base_model: str,
        adapter: Path | None,
        *,
        device: str,
        quantization: str,
        dequantize: bool = False,
        cuda_graphs: bool = True,
        cpu_merge: bool = True,
    ) -> None:
        from nli.classifier import NLIClassifier
        from nli.loading import load_base_model

        base = load_base_model(
            base_model,
            quantization=quantization,  # type: ignore[arg-type]
            device=device,
            dequantize=dequantize,
        )
        self.device = base.device
        self.classifier: Any = NLIClassifier(base, cuda_graphs=cuda_graphs, cpu_merge=cpu_merge)
        self.adapter = None
        if adapter is not None:
            self.adapter = adapter.name
            self.classifier.attach_adapter(adapter, name=self.adapter)

    def latency(
        self, pairs: list[tuple[str, str]], *, warmup: int, requests: int
    ) -> dict[str, Any]:
        import torch

        latencies = []
        for i in range(warmup + requests):
            started = time.perf_counter()
            # the answers come back to the host: synced
            self.classifier.score_pairs([pairs[i % len(pairs)]], self.adapter)
            if i >= warmup:
                latencies.append(time.perf_counter() - started)
        return {**latency_summary(latencies), "threads": torch.get_num_threads()}

    def close(self) -> None:
        """Give the model's device memory back before the server is measured."""
        import gc

        from nli.loading import free_device_memory

        self.classifier = None
        gc.collect()
        free_device_memory(self.device)


def one_client(
    client: httpx.Client, payloads: list[dict[str, Any]], *, warmup: int, requests: int
) -> dict[str, Any]:
    latencies = []
    errors = 0
    for i in range(warmup + requests):
        payload = payloads[i % len(payloads)]
        started = time.perf_counter()
        response = client.post("/classify", json=payload)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            errors += 1
        elif i >= warmup:
            latencies.append(elapsed)
    return {**latency_summary(latencies), "warmup": warmup, "errors": errors}


def hot_swap(client: httpx.Client, names: list[str], payload: dict[str, Any]) -> dict[str, Any]:
    """Load + first use of each adapter in ``names``, one at a time, unloading in between."""
    rows = []
    for name in names:
        started = time.perf_counter()
        load = client.post("/adapters", json={"name": name})
        loaded = time.perf_counter()
        first = client.post("/classify", json={**payload, "adapter": name})
        used = time.perf_counter()
        second = client.post("/classify", json={**payload, "adapter": name})
        steady = time.perf_counter()
        unload = client.delete(f"/adapters/{name}")
        statuses = [load.status_code, first.status_code, second.status_code, unload.status_code]
        if statuses != [200] * 4:
            raise SystemExit(f"hot swap of {name} failed: {statuses} {load.text[:300]}")
        rows.append(
            {
                "load_ms": 1000 * (loaded - started),
                "first_classify_ms": 1000 * (used - loaded),
                "load_plus_first_use_ms": 1000 * (used - started),
                "steady_classify_ms": 1000 * (steady - used),
            }
        )
    keys = rows[0].keys() if rows else []
    return {
        "repeats": len(rows),
        **{f"median_{k}": round(statistics.median(r[k] for r in rows), 1) for k in keys},
        **{f"max_{k}": round(max(r[k] for r in rows), 1) for k in keys},
    }


def reference_scores(
    client: httpx.Client,
    pairs: list[tuple[str, str]],
    adapters: list[str],
    loaded: set[str],
) -> dict[str, list[list[float]]]:
    """Sequential scores of each pair by each adapter (loading and unloading those not loaded)."""
    refs = {}
    for name in adapters:
        if name not in loaded:
            client.post("/adapters", json={"name": name}).raise_for_status()
        rows = []
        for premise, hypothesis in pairs:
            body = {"premise": premise, "hypothesis": hypothesis, "adapter": name}
            response = client.post("/classify", json=body)
            response.raise_for_status()
            rows.append([item["score"] for item in response.json()["scores"]])
        refs[name] = rows
        if name not in loaded:
            client.delete(f"/adapters/{name}").raise_for_status()
    return refs


def check_answers(
    result: LoadResult,
    payloads: list[dict[str, Any]],
    refs: dict[str, list[list[float]]],
    pair_of: list[int],
    tolerance: float,
) -> dict[str, Any]:
    """Compare every answer with the sequential reference scores of every adapter.

    ``wrong_adapter_name``: the answer names another adapter than the request did.
    ``nearer_other_adapter``: the scores are farther than ``tolerance`` from the reference of the
    adapter the answer names, and closer to another adapter's (what scoring with the wrong
    adapter looks like; adapters that agree on a pair within the tolerance cannot be told apart).
    ``beyond_tolerance``: farther than ``tolerance`` from its own reference (batching changes
    the numerics a little: bf16, padding, mixed-adapter batches).
    """
    wrong_name = unknown = nearer_other = beyond = 0
    worst = 0.0

    def distance(probs: tuple[float, ...], ref: list[float]) -> float:
        return max(abs(a - b) for a, b in zip(probs, ref, strict=True))

    for _, _, status, index, adapter, probs in result.records:
        if status != 200 or probs is None:
            continue
        asked = payloads[index].get("adapter")
        if asked is not None and adapter != asked:
            wrong_name += 1
            continue
        if adapter not in refs:
            unknown += 1
            continue
        pair = pair_of[index]
        own = distance(probs, refs[adapter][pair])
        worst = max(worst, own)
        beyond += own > tolerance
        nearer_other += own > tolerance and any(
            distance(probs, rows[pair]) < own for name, rows in refs.items() if name != adapter
        )
    names = list(refs)
    gaps = [
        distance(tuple(refs[x][j]), refs[y][j])
        for i, x in enumerate(names)
        for y in names[i + 1 :]
        for j in range(len(refs[x]))
    ]
    return {
        "checked": sum(1 for r in result.records if r[2] == 200),
        "wrong_adapter_name": wrong_name,
        "nearer_other_adapter": nearer_other,
        "unknown_adapter": unknown,
        "beyond_tolerance": beyond,
        "tolerance": tolerance,
        "max_deviation": round(worst, 5),
        "median_gap_between_adapters": round(statistics.median(gaps), 4) if gaps else None,
        "min_gap_between_adapters": round(min(gaps), 4) if gaps else None,
    }


def swap_cycles(
    client: httpx.Client, names: list[str], cycles: int, dwell_s: float, default: str
) -> dict[str, Any]:
    """Load, make default, switch back, unload: ``cycles`` times (runs while clients load)."""
    failures: list[str] = []
    load_ms = []
    for cycle in range(cycles):
        name = names[cycle % len(names)]
        started = time.perf_counter()
        steps = [("load", client.post("/adapters", json={"name": name}))]
        load_ms.append(1000 * (time.perf_counter() - started))
        steps.append(("set default", client.put("/adapters/default", json={"name": name})))
        time.sleep(dwell_s)
        steps.append(("restore default", client.put("/adapters/default", json={"name": default})))
        steps.append(("unload", client.delete(f"/adapters/{name}")))
        time.sleep(dwell_s)
        for what, response in steps:
            if response.status_code != 200:
                failures.append(f"cycle {cycle} {what} {name}: {response.status_code}")
    return {
        "cycles": cycles,
        "admin_failures": len(failures),
        "admin_failure_samples": failures[:5],
        "median_load_under_load_ms": round(statistics.median(load_ms), 1) if load_ms else None,
        "max_load_under_load_ms": round(max(load_ms), 1) if load_ms else None,
    }


# -- main -------------------------------------------------------------------------------------


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def env_flag(settings: dict[str, str], name: str, *, default: bool) -> bool:
    """A boolean ``NLI_*`` setting of the server's environment, for the in-process baseline
    (unset: the service's ``default``)."""
    value = settings.get(name)
    return default if value is None else value.lower() in ("1", "true", "yes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help=MODEL_CHOICES)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="SNLI-style .jsonl")
    parser.add_argument("--pairs", type=int, default=2000, help="distinct pairs to send")
    parser.add_argument("--warmup", type=int, default=20, help="1-client warm-up requests")
    parser.add_argument("--requests", type=int, default=200, help="1-client measured requests")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument(
        "--client-procs", type=int, default=0,
        help="processes the clients are spread over (0: min(8, CPUs/2), at least 1)",
    )  # fmt: skip
    parser.add_argument("--duration", type=float, default=10.0, help="load window, seconds")
    parser.add_argument("--load-warmup", type=float, default=1.0, help="seconds not counted")
    parser.add_argument("--swaps", type=int, default=5, help="hot-swap repeats")
    parser.add_argument("--swap-cycles", type=int, default=10, help="swap cycles under load")
    parser.add_argument("--swap-dwell", type=float, default=0.2, help="seconds between steps")
    parser.add_argument("--check-pairs", type=int, default=32, help="pairs checked under swaps")
    parser.add_argument("--check-tolerance", type=float, default=0.1)
    parser.add_argument("--max-swap-load-s", type=float, default=120.0)
    parser.add_argument(
        "--default-adapter", default=RANDOM_DEFAULT,
        help="NLI_DEFAULT_ADAPTER: the random bench-a (default), 'snli-smollm2' (shipped, "
        "SmolLM2 only) or 'base'",
    )  # fmt: skip
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=64, help="make_adapter's scale 4 at r=16")
    parser.add_argument("--adapter-dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--max-batch-size", type=int, default=None, help="NLI_MAX_BATCH_SIZE")
    parser.add_argument(
        "--max-batch-wait-ms", type=float, default=None, help="NLI_MAX_BATCH_WAIT_MS"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NLI_X=V", help="more server settings"
    )
    parser.add_argument("--access-log", action="store_true", help="keep the per-request log")
    parser.add_argument(
        "--phases", nargs="+", default=["one_client", "load", "hot_swap", "swaps_under_load"],
        choices=["one_client", "load", "hot_swap", "swaps_under_load"],
    )  # fmt: skip
    parser.add_argument(
        "--direct-baseline", action="store_true",
        help="also time NLIClassifier.score_pairs on one pair in this process (no HTTP)",
    )  # fmt: skip
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given")
    parser.add_argument(
        "--adapters-dir", type=Path, default=None,
        help="the random adapters' folder, made there when missing (default: WORKDIR/adapters)",
    )  # fmt: skip
    parser.add_argument("--server-log", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    # A step timeout (SIGTERM) must still stop the server: turn it into SystemExit for `finally`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nli-bench-classify-"))
    adapters_dir = args.adapters_dir or workdir / "adapters"
    base_model = resolve_model(args.model)
    swap_names = list(adapter_seeds(args.swaps))[2:]
    t = time.perf_counter()
    made = ensure_adapters(args, base_model, adapters_dir)
    adapters_s = time.perf_counter() - t
    adapter_bytes = sum(p.stat().st_size for p in (adapters_dir / RANDOM_DEFAULT).iterdir())

    pairs = read_pairs(args.data, args.pairs)
    plain = [{"premise": p, "hypothesis": h} for p, h in pairs]
    settings = {
        "NLI_BASE_MODEL": base_model,
        "NLI_DEVICE": args.device,
        "NLI_QUANTIZATION": args.quantization,
        "NLI_ADAPTERS_DIR": str(adapters_dir),
        "NLI_DEFAULT_ADAPTER": args.default_adapter,
        "NLI_DATA_DIR": str(workdir / "data"),
        "NLI_API_KEY": "",
    }
    if args.max_batch_size is not None:
        settings["NLI_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    if args.max_batch_wait_ms is not None:
        settings["NLI_MAX_BATCH_WAIT_MS"] = str(args.max_batch_wait_ms)
    settings.update(parse_env(args.env))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **settings}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.server_log or workdir / "server.log"
    procs = args.client_procs or max(1, min(8, (os.cpu_count() or 2) // 2))

    result: dict[str, Any] = {
        "benchmark": "classify_latency",
        "model": args.model,
        "base_model": base_model,
        "machine": machine(args.device),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in settings.items() if k != "NLI_API_KEY"},
        "access_log": args.access_log,
        # The server runs in this Python with this environment: what uvicorn picks there.
        "serving_stack": serving_stack(),
        "adapter": {"rank": args.rank, "alpha": args.alpha, "dtype": args.adapter_dtype,
                    "bytes": adapter_bytes, "made_in_s": round(adapters_s, 1), **made},
    }  # fmt: skip
    t = time.perf_counter()
    server = start_server(env, port, log, args.access_log)
    direct: DirectScorer | None = None
    try:
        if args.direct_baseline:
            found = [
                root / args.default_adapter
                for root in (adapters_dir, REPO_ROOT / "adapters")
                if args.default_adapter != "base" and (root / args.default_adapter).is_dir()
            ]
            direct = DirectScorer(
                base_model, found[0] if found else None, device=args.device,
                quantization=args.quantization,
                dequantize=env_flag(settings, "NLI_DEQUANTIZE", default=False),
                cuda_graphs=env_flag(settings, "NLI_CUDA_GRAPHS", default=True),
                cpu_merge=env_flag(settings, "NLI_CPU_MERGE", default=True),
            )  # fmt: skip
        ready = wait_ready(url, server, args.ready_timeout)
        # since the server process started (the direct baseline's model loads meanwhile)
        result["ready"] = {**ready, "seconds": round(time.perf_counter() - t, 1)}
        if ready.get("cuda_graphs") == "on":
            t = time.perf_counter()
            recorded = wait_graphs(url)
            result["ready"]["graphs_ahead_of_traffic"] = recorded
            result["ready"]["graphs_seconds"] = round(time.perf_counter() - t, 1)
        if direct is not None:  # the server is ready and idle: nothing shares the GPU
            result["direct"] = direct.latency(pairs, warmup=args.warmup, requests=args.requests)
            direct.close()
            direct = None
            print(f"direct score_pairs: {result['direct']}", flush=True)
        with httpx.Client(base_url=url, timeout=120.0) as client:
            if "one_client" in args.phases:
                result["one_client"] = one_client(
                    client, plain, warmup=args.warmup, requests=args.requests
                )
                print(f"one client: {result['one_client']}", flush=True)
            if "load" in args.phases:
                before = batch_counters(url)
                load = run_load(
                    url, plain, clients=args.clients, processes=procs,
                    duration_s=args.duration, warmup_s=args.load_warmup,
                )  # fmt: skip
                batching = batching_between(before, batch_counters(url))
                result["load"] = {**load.summary(), "batching": batching}
                print(f"load: {result['load']}", flush=True)
            if "hot_swap" in args.phases:
                result["hot_swap"] = hot_swap(client, swap_names[: args.swaps], plain[0])
                print(f"hot swap: {result['hot_swap']}", flush=True)
            if "swaps_under_load" in args.phases:
                result["swaps_under_load"] = swaps_under_load(client, url, pairs, procs, args)
                print(f"swaps under load: {result['swaps_under_load']}", flush=True)
    finally:
        if direct is not None:
            direct.close()
        result["server_exit"] = stop_server(server)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print_table(result)
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")


def swaps_under_load(
    client: httpx.Client,
    url: str,
    pairs: list[tuple[str, str]],
    procs: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    checked = pairs[: args.check_pairs]
    default = args.default_adapter
    swap_names = [f"swap-{i}" for i in range(2)]
    # bench-b stays loaded during the swaps; requests name it, name base, or name nothing.
    client.post("/adapters", json={"name": OTHER_ADAPTER}).raise_for_status()
    refs = reference_scores(
        client,
        checked,
        [default, OTHER_ADAPTER, "base", *swap_names],
        loaded={default, OTHER_ADAPTER, "base"},
    )
    payloads: list[dict[str, Any]] = []
    pair_of: list[int] = []
    for j, (premise, hypothesis) in enumerate(checked):
        for adapter in (None, OTHER_ADAPTER, "base"):
            body: dict[str, Any] = {"premise": premise, "hypothesis": hypothesis}
            if adapter is not None:
                body["adapter"] = adapter
            payloads.append(body)
            pair_of.append(j)
    admin: dict[str, Any] = {}

    def during() -> None:
        admin.update(swap_cycles(client, swap_names, args.swap_cycles, args.swap_dwell, default))

    load = run_load(
        url, payloads, clients=args.clients, processes=procs, duration_s=args.max_swap_load_s,
        warmup_s=args.load_warmup, keep_bodies=True, during=during,
    )  # fmt: skip
    check = check_answers(load, payloads, refs, pair_of, args.check_tolerance)
    client.delete(f"/adapters/{OTHER_ADAPTER}")
    return {**load.summary(), **admin, "check": check}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n/classify on {result['machine']}, model {result['model']}, commit {result['commit']}")
    rows = []
    if "direct" in result:
        r = result["direct"]
        rows.append(("in-process", f"p50 {r['p50_ms']} ms", f"p99 {r['p99_ms']} ms", "no HTTP"))
    if "one_client" in result:
        r = result["one_client"]
        rows.append(("1 client", f"p50 {r['p50_ms']} ms", f"p99 {r['p99_ms']} ms", f"n={r['n']}"))
    if "load" in result:
        r = result["load"]
        rows.append(
            (
                f"{r['clients']} clients",
                f"{r['requests_per_s']} req/s",
                f"p50 {r['latency_p50_ms']} ms p99 {r['latency_p99_ms']} ms",
                f"errors {r['errors']}",
            )
        )
    if "hot_swap" in result:
        r = result["hot_swap"]
        rows.append(
            (
                "hot swap",
                f"load+first use {r['median_load_plus_first_use_ms']} ms (median)",
                f"max {r['max_load_plus_first_use_ms']} ms",
                f"load {r['median_load_ms']} ms, first {r['median_first_classify_ms']} ms",
            )
        )
    if "swaps_under_load" in result:
        r = result["swaps_under_load"]
        c = r["check"]
        rows.append(
            (
                "swaps under load",
                f"{r['cycles']} cycles, {r['requests_per_s']} req/s",
                f"failed requests {r['errors']}, admin failures {r['admin_failures']}",
                f"wrong adapter {c['wrong_adapter_name'] + c['nearer_other_adapter']}, "
                f"max deviation {c['max_deviation']} (adapters differ by "
                f"{c['median_gap_between_adapters']})",
            )
        )
    for row in rows:
        print("  " + " | ".join(row))


if __name__ == "__main__":
    main()
