"""The evaluate stage: metrics with intervals, the operating point, predictions, plots, external sets, robustness -> reports/."""
