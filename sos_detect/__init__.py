"""sos-detect: Stochastic Optimum Shifting for YOLO detectors and classifiers."""
