from ddpm_cars.cli import main

raise SystemExit(main())
