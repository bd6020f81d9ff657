from tcserve.cli import main

raise SystemExit(main())
