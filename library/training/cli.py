"""The shared ``main`` of the training entry scripts: parse -> build -> run, errors as one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from library.errors import SdtkError


def run_training(script: str, trainer_cls: Any, argv: list[str] | None = None) -> int:
    """Parse ``script``'s flags, train with ``trainer_cls``, and return the process exit code.

    Every :class:`SdtkError` (bad flags, data, models, a stopped run) becomes one ``error: ...``
    line on stderr and exit code 1.
    """
    from library.config.args import output_config_path, parse_args
    from library.utils.logging import configure_logging

    try:
        args = parse_args(script, argv)
        if args.output_config:  # parse_args wrote the effective config; kohya exits here
            print(f"wrote the effective config to {output_config_path(args)}")
            return 0
        configure_logging(args)
        trainer = trainer_cls(args)
        final = trainer.train()
        if final is not None:
            print(f"{trainer.output_label()} saved to {final}")
            if args.sample_prompts:
                print(f"sample images in {Path(args.output_dir) / 'sample'}")
        return 0
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
