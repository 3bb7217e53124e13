"""The local mesh launcher behind `make up`."""
