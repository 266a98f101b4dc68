import sys

from .app.cli import main, setup_process

setup_process()
sys.exit(main())
