from mone.server.cli import main

raise SystemExit(main())
