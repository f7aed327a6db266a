from client_part.cli import main

raise SystemExit(main())
