from bloomlm.cli import main

raise SystemExit(main())
