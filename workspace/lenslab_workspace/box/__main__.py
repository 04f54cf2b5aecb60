import sys

from lenslab_workspace.box.cli import main

sys.exit(main())
