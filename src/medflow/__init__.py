"""medflow: folders of medical images -> validated, split, trained, evaluated, monitored classifiers."""

from medflow import tf_startup

__version__ = "0.1.0"
tf_startup.install()
