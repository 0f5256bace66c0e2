import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported

from lingshu_rl.launch.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
