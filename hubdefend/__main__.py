from hubdefend.cli import main

main()
