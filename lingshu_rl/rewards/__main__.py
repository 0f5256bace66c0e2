import sys

from lingshu_rl.rewards.cli import main

sys.exit(main())
