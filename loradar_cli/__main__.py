from loradar_cli.cli.app import main

main()
