import sys

from grokstudy.cli import main

sys.exit(main())
