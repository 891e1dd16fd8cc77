"""Fuzz target for the decode stage: `VideoReader` over arbitrary bytes must finish or raise ModerationError.

Anything else (another exception, a crash, a hang past libFuzzer's -timeout, memory past -rss_limit_mb)
is a bug: FFmpeg and PyAV get hostile bytes in production, and the worker must turn every one into a
typed verdict.

With atheris (coverage-guided, libFuzzer flags):

    python tests/fuzz_decode.py -max_total_time=60 -timeout=30 -rss_limit_mb=3072 -max_len=262144 SEED_DIR

Without it, a seeded mutation loop over the same target (bounded by count and time):

    python tests/fuzz_decode.py --mutate --runs 2000 --max-seconds 60 --seed 1 SEED_DIR

Crashing inputs are written to -artifact_prefix (atheris) or --artifacts (the loop), and can be
replayed with `python tests/fuzz_decode.py --replay FILE`.
"""
from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av  # noqa: E402,F401 - imported before instrumentation: compiled, nothing to instrument
import numpy  # noqa: E402,F401

try:
    import atheris
except ImportError:  # the mutation loop below needs nothing else
    atheris = None

if atheris is not None and "--mutate" not in sys.argv and "--replay" not in sys.argv:
    with atheris.instrument_imports(include=["worker"]):
        from worker.decode import Limits, VideoReader
        from worker.errors import ModerationError
else:
    from worker.decode import Limits, VideoReader
    from worker.errors import ModerationError

LIMITS = Limits(max_duration_s=120.0, max_pixels=4096 * 2304, decode_timeout_s=10.0)
FRAMES = 4


def check_one(data: bytes) -> None:
    """The property under test. Raises whatever is not a ModerationError."""
    mode = "exact" if len(data) % 2 else "fast"  # both sampling paths, chosen by the input itself
    try:
        with VideoReader(io.BytesIO(data), LIMITS) as reader:
            for frame in reader.sample(FRAMES, mode=mode):
                assert frame.image.ndim == 3 and frame.image.shape[2] == 3, frame.image.shape
                assert frame.image.shape[0] * frame.image.shape[1] <= LIMITS.max_pixels
    except ModerationError:
        pass


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    check_one(data)


# -- the mutation loop (no atheris) -----------------------------------------------------------------
INTERESTING = [0x00, 0x01, 0x7F, 0x80, 0xFF]


def mutate(data: bytes, rng: random.Random, seeds: list[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if not out:
            out += bytes(rng.randrange(256) for _ in range(16))
        op = rng.randrange(7)
        pos = rng.randrange(len(out))
        if op == 0:  # flip a bit
            out[pos] ^= 1 << rng.randrange(8)
        elif op == 1:  # an interesting byte
            out[pos] = rng.choice(INTERESTING)
        elif op == 2:  # an interesting 32-bit value (sizes, counts, dimensions)
            value = rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 20000, 65535, rng.randrange(1 << 32)])
            out[pos:pos + 4] = value.to_bytes(4, rng.choice(["big", "little"]))
        elif op == 3:  # delete a chunk
            del out[pos:pos + rng.randint(1, 512)]
        elif op == 4:  # duplicate a chunk
            chunk = out[pos:pos + rng.randint(1, 512)]
            at = rng.randrange(len(out))
            out[at:at] = chunk
        elif op == 5:  # truncate
            del out[rng.randrange(len(out)):]
        else:  # splice in a piece of another seed
            other = rng.choice(seeds)
            if other:
                a = rng.randrange(len(other))
                out[pos:pos + rng.randint(1, 4096)] = other[a:a + rng.randint(1, 4096)]
    return bytes(out)


def mutation_loop(seed_dirs: list[Path], runs: int, max_seconds: float, seed: int, artifacts: Path) -> int:
    seeds = [p.read_bytes() for d in seed_dirs for p in sorted(d.iterdir()) if p.is_file()]
    if not seeds:
        seeds = [b""]
    rng = random.Random(seed)
    deadline = time.monotonic() + max_seconds
    done = 0
    for seed_data in seeds:  # the seeds themselves first
        _run_or_report(seed_data, artifacts, done)
        done += 1
    while done < runs and time.monotonic() < deadline:
        _run_or_report(mutate(rng.choice(seeds), rng, seeds), artifacts, done)
        done += 1
    print(f"mutation loop: {done} inputs in {max_seconds - max(0.0, deadline - time.monotonic()):.1f} s, no failure")
    return 0


def _run_or_report(data: bytes, artifacts: Path, index: int) -> None:
    try:
        check_one(data)
    except BaseException:
        artifacts.mkdir(parents=True, exist_ok=True)
        path = artifacts / f"crash-{index}"
        path.write_bytes(data)
        print(f"FAILURE on input {index} ({len(data)} bytes), saved to {path}", file=sys.stderr)
        raise


def main(argv: list[str]) -> int:
    if "--replay" in argv:
        path = Path(argv[argv.index("--replay") + 1])
        check_one(path.read_bytes())
        print(f"{path}: ok")
        return 0
    if "--mutate" in argv or atheris is None:
        parser = argparse.ArgumentParser(description=__doc__)
        parser.add_argument("--mutate", action="store_true")
        parser.add_argument("--runs", type=int, default=2000)
        parser.add_argument("--max-seconds", type=float, default=60.0)
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"))
        parser.add_argument("seed_dirs", nargs="*", type=Path)
        args, _ = parser.parse_known_args(argv[1:])
        return mutation_loop(args.seed_dirs, args.runs, args.max_seconds, args.seed, args.artifacts)
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
