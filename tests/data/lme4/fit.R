# lme4's REML fits of the study's two condition-level models on the committed tiny run's out-of-domain EM
# effects (design_ood.csv, written from reference/tiny/results.csv by the project's own functions), printed as
# JSON for tests/test_stats_reference.py. Run from this folder: Rscript fit.R > lme4_fits.json
# (Debian: apt-get install r-base-core r-cran-lme4).
suppressMessages(library(lme4))
d <- read.csv("design_ood.csv")
d$constitution <- relevel(factor(d$constitution), ref = "neutral")
fits <- list(
  primary = lmer(em_effect ~ log2_level + (1|item_id) + (1|condition) + (1|draw),
                 data = subset(d, constitution == "candor"), REML = TRUE),
  constitution = lmer(em_effect ~ log2_level * constitution + (1|item_id) + (1|condition) + (1|draw),
                      data = d, REML = TRUE))
num <- function(x) formatC(x, digits = 12, format = "g")
obj <- function(names, values) paste0("{", paste0('"', names, '": ', num(values), collapse = ", "), "}")
one <- function(f) {
  vc <- as.data.frame(VarCorr(f))
  paste0('{"fixed": ', obj(names(fixef(f)), fixef(f)),
         ', "se": ', obj(names(fixef(f)), sqrt(diag(as.matrix(vcov(f))))),
         ', "variances": ', obj(vc$grp, vc$vcov),
         ', "reml_criterion": ', num(REMLcrit(f)),
         ', "lme4": "', packageVersion("lme4"), '"}')
}
cat(paste0("{", paste0('"', names(fits), '": ', sapply(fits, one), collapse = ",\n "), "}\n"))
