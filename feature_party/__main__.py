from feature_party.cli import main

raise SystemExit(main())
