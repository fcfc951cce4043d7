"""Analysis of fitted models: estimators compared, gaps, diagnostics, results, figures."""
