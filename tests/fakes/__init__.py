"""Test doubles for what cannot run here (TGI, a GPU)."""
