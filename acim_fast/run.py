"""The one entry point: `python -m acim_fast.run [--field value ...]` (see `--help`).

It resolves the configuration (defaults: the embedded tiny model on the built-in task) and runs the
AutoCode EM loop. The EM loop is not built yet: until it is, this prints the resolved configuration,
says plainly what is missing, trains nothing and exits with status 3.
"""

from __future__ import annotations

import sys

from .config import parse_args

NOT_AVAILABLE = """\
acim_fast: training is not available yet - nothing was trained.
Built so far: the fused off-policy loss (acim_kernels), the Llama/Qwen2 decoder, the paged sampler with
copy-on-write forking, the code sandbox, the answer verifier, the tool-integrated rollout loop, the embedded
task with its tiny model and warm-up SFT (acim_fast.sft.warm_up), and `python -m acim_fast.evaluate`.
Still missing before `python -m acim_fast.run` can train: the EM loop (E-step exploration, M-step updates)."""


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    print(f"resolved config:\n{config.to_json()}")
    print(NOT_AVAILABLE, file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
