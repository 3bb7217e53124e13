"""What the tests share: starting and stopping processes (procs), waiting for
a condition (wait), the launched mesh and its TGI doubles (mesh), the mesh
assembled part by part for fault injection (parts), the mesh fixtures
(fixtures), and the deployment files read as data (deploy).

Where a test goes:
  tests/unit         in-process only: starts no process, builds nothing, runs
                     no outside tool (tests/unit/conftest.py refuses a subprocess)
  tests/component    real servers inside the test process, on port 0
  tests/programs     runs a program over committed files (Envoy's validator,
                     promtool, kubectl, hadolint, docker compose, pip, `--help`)
  tests/integration  the services as real processes, up to the whole mesh
`make test-fast` runs the first two; `make test` runs all four.
"""
