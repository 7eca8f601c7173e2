"""The peer's side of bench/profile_step.py: kohya's trainer, same flags, same per-step report (issue 12).

    ~/peer/venv/bin/python bench/profile_kohya_step.py --family sd1|sdxl [--steps 6] [--profile out.txt]

Run it with kohya's interpreter (``$PEER/venv/bin/python``); it imports ``train_network`` /
``sdxl_train_network`` from ``$PEER/sd-scripts`` and hooks its ``sample_images`` (called after every
optimizer step) to print wall/CPU seconds and minor page faults per step, and to run
``torch.profiler`` over steps 3..N. The command line is :func:`bench.profile_step.peer_flags`'s.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from profile_step import ROOT, peer_flags  # noqa: E402
from step_meter import StepMeter, common_parser  # noqa: E402

sys.path.remove(str(ROOT))  # profile_step puts sdtk first; kohya's ``library`` must win here


def main() -> int:
    o = common_parser(__doc__, "/tmp/kohya_profile_out").parse_args()
    peer = Path(o.peer)
    os.chdir(peer / "sd-scripts")
    sys.path.insert(0, str(peer / "sd-scripts"))
    sdxl = o.family == "sdxl"
    if sdxl:
        import sdxl_train_network as script
        trainer_cls = script.SdxlNetworkTrainer
    else:
        import train_network as script
        trainer_cls = script.NetworkTrainer
    from library import train_util

    meter = StepMeter(o.profile)

    class Trainer(trainer_cls):
        def sample_images(self, accelerator, args, epoch, global_step, *rest):
            if epoch is None or global_step == 0:  # before step 1 and after every optimizer step
                meter.mark()

    parser = script.setup_parser()
    args = parser.parse_args(peer_flags(peer, sdxl, o.steps, o.out) + shlex.split(o.extra))
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    Trainer().train(args)
    meter.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
