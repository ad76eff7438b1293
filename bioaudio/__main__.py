from bioaudio.cli import main

raise SystemExit(main())
