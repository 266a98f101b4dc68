import sys

from ._cli import main, setup_process

setup_process()
sys.exit(main())
