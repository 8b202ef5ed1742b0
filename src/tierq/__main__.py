from tierq.cli import main

main()
