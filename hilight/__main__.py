from hilight.cli import main

raise SystemExit(main())
