"""Configs that ship with policycascade: ``--config NAME`` reads ``NAME.yaml`` from here."""
