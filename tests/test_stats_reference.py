"""The project's model-fitting code against lme4's printed REML fit of sleepstudy (method 8):
Reaction ~ Days + (Days | Subject)."""
import numpy as np
import pandas as pd

from persona_em import stats


def test_sleepstudy_matches_lme4(shared):
    d = pd.read_csv(shared / "sleepstudy.csv")
    fit = stats.fit_mixed(d, "Y ~ U", group="G", re_formula="~U")
    fe, se = fit.fe_params, fit.bse
    # lme4 prints 3 decimals for fixed effects and SEs, 2 for variances, 1 for the REML criterion
    assert round(fe["Intercept"], 3) == 251.405 and round(se["Intercept"], 3) == 6.825
    assert round(fe["U"], 3) == 10.467 and round(se["U"], 3) == 1.546
    assert round(fit.cov_re.iloc[0, 0], 2) == 612.10
    assert round(fit.cov_re.iloc[1, 1], 2) == 35.07
    assert round(fit.scale, 2) == 654.94
    assert round(-2 * fit.llf, 1) == 1743.6
    corr = fit.cov_re.iloc[0, 1] / np.sqrt(fit.cov_re.iloc[0, 0] * fit.cov_re.iloc[1, 1])
    assert round(corr, 2) == 0.07
