from server_part.cli import main

raise SystemExit(main())
