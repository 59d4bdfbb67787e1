"""Analyze stage: Gram caches from activation stores, and CKA for every layer pair of every model pair."""
