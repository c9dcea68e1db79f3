from transfusion.cli import main

raise SystemExit(main())
