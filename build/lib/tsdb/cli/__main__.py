import sys

from tsdb.cli.main import main

sys.exit(main())
