from label_party.cli import main

raise SystemExit(main())
