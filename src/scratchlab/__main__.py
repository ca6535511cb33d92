from scratchlab.cli import main

raise SystemExit(main())
