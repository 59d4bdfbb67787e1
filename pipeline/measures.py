"""``ckapipe.measures``: similarity measures computed from linear Grams (RSA, Procrustes, CCA,
SVCCA, PWCCA, regression R², mutual k-NN, CKA); the implementation and its documentation are in
:mod:`ckapipe.analyze.measures`, re-exported here unchanged."""

from ckapipe.analyze.measures import *  # noqa: F403
from ckapipe.analyze.measures import __all__  # noqa: F401
