import sys

from lingshu_rl.eval.cli import main

sys.exit(main())
