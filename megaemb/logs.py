"""Training logs: a progress bar, interval lines, TensorBoard events, and a PNG of the curves.

Only global rank 0 logs (``enabled``). MFU = achieved FLOPs / (peak bf16 FLOPs x ranks), with
FLOPs from ``megaemb.model.flops.train_flops``; reported as n/a where the peak is unknown (CPU).
"""
from __future__ import annotations

import json
import os
import sys

import torch.distributed as dist
from tqdm import tqdm

from megaemb import platform
from megaemb.outputs import atomic_file
from megaemb.preflight import RUN_MARKER


def micro_batch_note(packed: bool, max_tokens: int = 0) -> str:
    """The log line saying how a step's texts become model inputs (``--packing``), in words."""
    if packed:
        line = ("micro-batches: packed (--packing true): a micro-batch's texts are concatenated into "
                "one row, kept apart by a document mask; padding only rounds the row's length up")
    else:
        line = ("micro-batches: padded (--packing false): one row per text, each padded to the longest "
                "text of its micro-batch")
    line += " (each step's line gives the padding share)"
    return line + (f"; at most {max_tokens} tokens each (--max_tokens_per_micro_batch)" if max_tokens else "")


class TrainLogger:
    def __init__(self, out_dir: str, enabled: bool):
        self.enabled = enabled
        self.out_dir = out_dir
        self.losses: list[tuple[int, float]] = []
        self.evals: list[tuple[int, dict]] = []
        self.writer = None
        if enabled and out_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, RUN_MARKER), "w") as f:  # see preflight.resolve_load
                f.write("megaemb sft writes here; no checkpoint is complete until megaemb.json exists\n")
            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def progress(self, start: int, total: int):
        """A progress bar on a terminal; none in a log file (no TTY), where the interval
        lines (``--log_interval``) are the progress, one line each."""
        return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True, mininterval=1.0,
                    disable=not self.enabled or not sys.stderr.isatty())

    def record_loss(self, step: int, loss: float) -> None:
        self.losses.append((step, loss))
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)

    def log_interval(self, step: int, window: list[dict], elapsed: float) -> None:
        if not self.enabled or not window:
            return
        n = len(window)
        tokens = sum(s["tokens"] for s in window)
        samples = sum(s["samples"] for s in window)
        flops = sum(s["flops"] for s in window)
        peak = platform.peak_flops()
        world = dist.get_world_size() if dist.is_initialized() else 1
        stats = {
            "loss": sum(s["loss"] for s in window) / n, "lr": window[-1]["lr"],
            "grad_norm": window[-1]["grad_norm"], "tokens_per_s": tokens / elapsed,
            "samples_per_s": samples / elapsed, "padding": sum(s["padding"] for s in window) / n,
            "micro_batches": window[-1]["micro_batches"], **platform.memory_stats(),
        }
        replay = [s["replay_error"] for s in window if "replay_error" in s]
        if replay:  # gradient caching: how far the replayed forward strayed from the first
            stats["replay_error"] = max(replay)
        mfu = flops / elapsed / (peak * world) if peak else None
        mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        tqdm.write(f"step {step}: loss {stats['loss']:.4f} lr {stats['lr']:.3e} grad_norm "
                   f"{stats['grad_norm']:.3f} tokens/s {stats['tokens_per_s']:.0f} samples/s "
                   f"{stats['samples_per_s']:.1f} padding {100 * stats['padding']:.0f}% MFU {mfu_text} "
                   f"mem {stats['mem_peak_gib']:.2f} GiB micro-batches {stats['micro_batches']}"
                   + (f" replay_error {stats['replay_error']:.1e}" if replay else ""))
        if self.writer:
            for k, v in stats.items():
                if k != "loss":
                    self.writer.add_scalar(f"train/{k}", v, step)
            if mfu is not None:
                self.writer.add_scalar("train/mfu", mfu, step)

    def log_eval(self, step: int, metrics: dict) -> None:
        if not self.enabled or not metrics:
            return
        self.evals.append((step, metrics))
        tqdm.write(f"eval @ step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if self.writer:
            for k, v in metrics.items():
                self.writer.add_scalar(f"eval/{k}", v, step)

    def write_metrics(self, summary: dict) -> None:
        """``<out_dir>/metrics.json`` (atomic): the run's summary, numbers as plain floats."""
        if not self.enabled or not self.out_dir:
            return
        with atomic_file(os.path.join(self.out_dir, "metrics.json")) as f:
            json.dump(plain(summary), f, indent=2)

    def finish(self) -> None:
        """Flush TensorBoard and draw ``curves.png`` (loss, and eval metrics if any)."""
        if not self.enabled or not self.out_dir:
            return
        if self.writer:
            self.writer.close()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2 if self.evals else 1, figsize=(11 if self.evals else 6, 4),
                                 squeeze=False)
        steps, values = zip(*self.losses) if self.losses else ((), ())
        axes[0][0].plot(steps, values)
        axes[0][0].set(title="train loss", xlabel="step")
        if self.evals:
            for key in self.evals[-1][1]:
                axes[0][1].plot([s for s, _ in self.evals], [m[key] for _, m in self.evals],
                                marker="o", label=key)
            axes[0][1].set(title="eval", xlabel="step")
            axes[0][1].legend()
        fig.tight_layout()
        with atomic_file(os.path.join(self.out_dir, "curves.png"), "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        plt.close(fig)


def plain(value):
    """numpy / torch scalars inside dicts and lists -> Python floats and ints (for JSON, print)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
