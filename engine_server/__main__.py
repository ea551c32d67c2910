import sys

from engine_server.cli import main

if __name__ == "__main__":  # vLLM spawns processes: the guard keeps children from re-running main
    sys.exit(main())
