"""The megaemb demo: make a tiny Qwen3 embedder (real Qwen3 tokenizer, random weights), convert
it to Megatron-Core with TP=2 and check it against transformers, train it on a debian-desc
slice on 2 CPU processes with TP=2, and load the exported model in sentence-transformers; then
the reranker stage (run_reranker_demo.py): a tiny reranker trained on the same slice reranks
the trained embedder's top-20."""
import os
import shutil
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "demo_out")


def megaemb(*args, nproc=2):
    """Run ``megaemb ARGS`` on ``nproc`` processes; it gets SIGTERM (and stops its ranks) if
    this demo dies first, however it dies (Linux)."""
    from megaemb.launcher import set_parent_death_signal

    env = dict(os.environ, NPROC_PER_NODE=str(nproc), PYTHONWARNINGS="ignore")
    print("$", "NPROC_PER_NODE=%d megaemb" % nproc, " ".join(args), flush=True)
    demo = os.getpid()

    def stop_with_demo():
        if sys.platform.startswith("linux") and not set_parent_death_signal(signal.SIGTERM, demo):
            os.kill(os.getpid(), signal.SIGTERM)
    subprocess.run([sys.executable, "-m", "megaemb.cli", *args], env=env, check=True, cwd=ROOT,
                   preexec_fn=stop_with_demo)


def guarded(script: str, out: str, stage) -> None:
    """Run ``stage()`` holding ``out``'s lock (``out.lock`` beside it; a second demo writing
    there at the same time stops with one line naming the first); a failed ``megaemb`` step
    (its error is printed above), a busy ``out`` or Ctrl-C end in one line."""
    from megaemb.outputs import owned

    name = os.path.basename(script)
    try:
        with owned(out, False, out, script):
            stage()
    except FileExistsError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as e:
        print(f"{name}: error: `megaemb {e.cmd[3]}` failed (exit {e.returncode}); its error is above",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: stopped by SIGINT", file=sys.stderr)
        sys.exit(130)


def main():
    guarded("demo/run_demo.py", OUT, run)


def run():
    from megaemb.tiny import make_tiny_checkpoint

    shutil.rmtree(OUT, ignore_errors=True)
    hf = make_tiny_checkpoint(os.path.join(OUT, "tiny-qwen3"), seed=0)
    megaemb("export", "--model", hf, "--to_mcore", "true", "--output_dir", os.path.join(OUT, "tiny-mcore"),
            "--tensor_model_parallel_size", "2", "--test_convert_precision", "true")
    megaemb("sft", "--config", "configs/demo-tiny-cpu.yaml", "--model", hf, "--save", os.path.join(OUT, "run"))
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(os.path.join(OUT, "run", "hf_model"), device="cpu")
    q = model.encode(["command-line JSON processor"], prompt_name="query")
    d = model.encode(["jq is like sed for JSON data", "GNU C library: shared libraries"])
    print("sentence-transformers similarities of the trained model:", (q @ d.T).round(3).tolist())
    print(f"outputs: {OUT}/run (checkpoints, tensorboard/, curves.png, hf_model/)")
    import run_reranker_demo

    run_reranker_demo.run(os.path.join(OUT, "run", "hf_model"))
    print(f"reranker outputs: {OUT}/reranker (tiny-qwen3-reranker/, run/, eval-*.json)")


if __name__ == "__main__":
    main()
