"""python -m branchctl"""

from branchctl.cli import main

main()
