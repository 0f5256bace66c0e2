import sys

from lingshu_rl.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
