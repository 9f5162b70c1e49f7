"""train.py, killed for real when a chosen step is about to start: SIGKILL, as an out-of-memory killer or
a pulled plug would, right after the previous step and whatever it wrote. The kill-and-resume tests and
gpu_check.py use it, so that train.py's loop carries no test-only branch.

    python tools/kill_at.py STEP [train.py's flags]
    torchrun --nproc_per_node 2 tools/kill_at.py STEP [train.py's flags]      (every process dies there)
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

if __name__ == "__main__":
    step, get_lr = int(sys.argv[1]), train.get_lr

    def get_lr_or_die(t, *args):  # train.py asks for step t's learning rate first thing in step t
        if t == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return get_lr(t, *args)

    train.get_lr = get_lr_or_die
    train.main(sys.argv[2:])
