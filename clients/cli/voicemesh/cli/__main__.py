import sys

from voicemesh.cli.main import main

sys.exit(main())
