"""medflow: folders of medical images -> validated, split, trained, evaluated, monitored classifiers."""

__version__ = "0.1.0"
