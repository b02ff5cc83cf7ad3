"""Headings and captions of the reports and the journal in English and Chinese.

One small table: :func:`text` looks a key up for a language and fills in ``{placeholders}``. Numbers are
formatted by the callers, the same in every language.
"""

from __future__ import annotations

LANGS = ("en", "zh")

_TEXT: dict[str, dict[str, str]] = {
    # report
    "report_title": {"en": "Comparison report: {experiment}", "zh": "对比实验报告：{experiment}"},
    "results": {"en": "Results", "zh": "实验结果"},
    "plots": {"en": "Plots", "zh": "图表"},
    "network": {"en": "Network", "zh": "网络结构图"},
    "configs": {"en": "Configurations", "zh": "实验配置"},
    "environment": {"en": "Environment", "zh": "运行环境"},
    "failed_runs": {"en": "Failed runs", "zh": "失败的运行"},
    "robustness": {"en": "Robustness", "zh": "鲁棒性"},
    "base_config": {"en": "Base run config (seed {seed})", "zh": "基础运行配置（种子 {seed}）"},
    "methods_overrides": {"en": "Methods and their overrides", "zh": "各方法及其覆盖参数"},
    "spec": {"en": "Experiment spec", "zh": "实验设置文件"},
    "caption": {
        "en": "{title}: test {metrics} (%) on {data}, {stat}; budget: {budget}",
        "zh": "{title}：{data} 上的测试{metrics}（%），{stat}；训练预算：{budget}",
    },
    "caption_stat": {"en": "mean ± std over {n} seeds ({seeds})", "zh": "{n} 个随机种子（{seeds}）的均值 ± 标准差"},
    "caption_one_seed": {"en": "one seed ({seeds}), so no std", "zh": "单个随机种子（{seeds}），无标准差"},
    "and": {"en": " and ", "zh": "与"},
    "metric_accuracy": {"en": "accuracy", "zh": "准确率"},
    "metric_macro_f1": {"en": "macro-F1", "zh": "宏平均 F1"},
    "metric_kappa": {"en": "Cohen's kappa", "zh": "Kappa 系数"},
    "metric_f1_change": {"en": "F1 of the change class", "zh": "变化类 F1"},
    "metric_miou": {"en": "mIoU", "zh": "mIoU"},
    "in_sample_note": {
        "en": "In-sample test metrics (the test split holds the training samples too, data.fold=all; they measure the fit, not generalisation; `fuselab evaluate` scores held-out data): {methods}.",
        "zh": "样本内测试指标（测试集包含训练样本，data.fold=all；反映拟合程度而非泛化能力；用 `fuselab evaluate` 在独立数据上评估）：{methods}。",
    },
    "one_seed_note": {
        "en": "n = 1: a single seed, so no std or CI is shown (not a zero variance).",
        "zh": "n = 1：只有一个随机种子，因此不显示标准差与置信区间（并非方差为零）。",
    },
    "latency_note": {
        "en": "Latency: median over repeated forward passes [interquartile range].",
        "zh": "延迟：多次前向传播的中位数 [四分位距]。",
    },
    "unsteady_note": {
        "en": "Unsteady latency (interquartile range above {limit} % of the median, the machine was probably busy; profile again on an idle machine): {methods}.",
        "zh": "延迟不稳定（四分位距超过中位数的 {limit} %，机器可能正忙；请在空闲机器上重新测量）：{methods}。",
    },
    # what a report leaves out, stated above its table
    "missing_head": {
        "en": "Incomplete: {k} of {n} runs are not in this table: {details}.",
        "zh": "结果不完整：{n} 个运行中有 {k} 个不在此表中：{details}。",
    },
    "missing_pending": {"en": "{n} pending", "zh": "{n} 个待运行"},
    "missing_running": {"en": "{n} running", "zh": "{n} 个运行中"},
    "missing_failed": {"en": "{n} failed", "zh": "{n} 个失败"},
    "missing_interrupted": {"en": "{n} interrupted", "zh": "{n} 个被中断"},
    "missing_missing": {"en": "{n} done but without their folder", "zh": "{n} 个已完成但文件夹缺失"},
    "missing_runs": {"en": "{status} ({runs})", "zh": "{status}（{runs}）"},
    "missing_run": {"en": "{method} seed {seed}", "zh": "{method} 种子 {seed}"},
    "missing_seeds": {
        "en": "Methods with fewer seeds than the spec: {items}.",
        "zh": "种子数少于实验设置的方法：{items}。",
    },
    "missing_seed_item": {"en": "{method} {done} of {planned}", "zh": "{method} {planned} 个中的 {done} 个"},
    "missing_left_out": {"en": " (left out of the table)", "zh": "（未列入表中）"},
    "missing_fix": {
        "en": "`{command}` trains what is missing (failed and interrupted runs are retried).",
        "zh": "`{command}` 会补完缺少的运行（失败和中断的运行会重试）。",
    },
    "budget_epochs": {"en": "equal epochs ({epochs})", "zh": "相同轮数（{epochs} 轮）"},
    "budget_equal": {"en": "equal epochs", "zh": "相同轮数"},
    "cap_params": {
        "en": "Test accuracy against parameters; error bars: std over seeds; star: baseline.",
        "zh": "测试准确率与参数量的关系；误差线为各种子的标准差；星号为基线。",
    },
    "cap_flops": {
        "en": "Test accuracy against FLOPs per sample; error bars: std over seeds; star: baseline.",
        "zh": "测试准确率与单样本 FLOPs 的关系；误差线为各种子的标准差；星号为基线。",
    },
    "cap_curves": {
        "en": "Training curves: training loss and validation accuracy per epoch, mean over seeds (band: ± std over seeds).",
        "zh": "训练曲线：每轮的训练损失与验证准确率，各种子的均值（阴影：各种子的 ± 标准差）。",
    },
    "cap_curves_multiples": {
        "en": "Validation accuracy per epoch, one panel per method: mean over seeds (band: ± std over seeds); "
              "grey dashed: the baseline {baseline}, repeated in every panel.",
        "zh": "每轮的验证准确率，每个方法一幅小图：各种子的均值（阴影：各种子的 ± 标准差）；灰色虚线：基线 {baseline}，每幅小图中重复绘出。",
    },
    "cap_curves_no_loss": {
        "en": "Training loss not shown: the methods train with different loss terms, so their totals are not on one scale.",
        "zh": "未绘出训练损失：各方法的损失项不同，其总和不可直接比较。",
    },
    "plots_english": {
        "en": "Text in the plots is in English: no font with Chinese glyphs is installed.",
        "zh": "图中文字为英文：本机未安装含中文字形的字体（如 Noto Sans CJK，可安装 fonts-noto-cjk）。",
    },
    "cap_robustness": {
        "en": "Robustness: test accuracy under increasing corruption, mean over seeds; error bars: ± std over "
              "seeds (methods offset slightly along the level axis so that their bars do not overlap).",
        "zh": "鲁棒性：随扰动强度增加的测试准确率，各种子的均值；误差线为各种子的 ± 标准差（各方法沿扰动强度轴略微错开，避免误差线重叠）。",
    },
    "cap_robustness_modalities": {
        "en": "Test accuracy against corruption level, one corrupted modality per column, mean over seeds; "
              "error bars: ± std over seeds (methods offset slightly along the level axis).",
        "zh": "测试准确率与扰动强度的关系，每列扰动一个模态，各种子的均值；误差线为各种子的 ± 标准差（各方法沿扰动强度轴略微错开）。",
    },
    "cap_heatmap": {
        "en": "Ablation: mean test accuracy (%) over seeds for {rows} x {cols}.",
        "zh": "消融实验：{rows} x {cols} 的测试准确率均值（%）。",
    },
    "cap_figure": {
        "en": "Network of the baseline ({method}) as its config describes it.",
        "zh": "基线模型（{method}）的网络结构图，由其配置生成。",
    },
    "md_values": {
        "en": "Values: mean ± std over seeds in %; ±CI: half-width of the 95 % t confidence interval; best mean per metric in bold. Baseline: {baseline}.",
        "zh": "数值：各种子的均值 ± 标准差（%）；±CI：95 % t 置信区间的半宽；每个指标的最佳均值加粗。基线：{baseline}。",
    },
    "md_marks": {
        "en": "▲/▼: better/worse than the baseline, paired t-test over seeds and McNemar's test on pooled test predictions both p < {alpha} after Holm correction across {n} methods.",
        "zh": "▲/▼：显著优于/劣于基线，即种子配对 t 检验与合并测试预测上的 McNemar 检验经 Holm 校正（{n} 个方法）后均 p < {alpha}。",
    },
    "col_method": {"en": "Method", "zh": "方法"},
    "col_seeds": {"en": "Seeds", "zh": "种子数"},
    "col_params": {"en": "Params", "zh": "参数量"},
    "col_flops": {"en": "FLOPs", "zh": "FLOPs"},
    "col_vs": {"en": "vs. baseline", "zh": "对比基线"},
    "col_fusion_check": {"en": "Fusion check", "zh": "融合检查"},
    "col_latency_b1": {"en": "Latency b1 (ms)", "zh": "延迟 b1 (ms)"},
    "col_latency_b64": {"en": "Latency b64 (ms)", "zh": "延迟 b64 (ms)"},
    "col_peak_mem": {"en": "Peak mem. (MB)", "zh": "峰值内存 (MB)"},
    "Accuracy": {"en": "Accuracy", "zh": "准确率"},
    "Macro-F1": {"en": "Macro-F1", "zh": "宏平均 F1"},
    "baseline_mark": {"en": "(baseline)", "zh": "（基线）"},
    "generated": {"en": "Generated {when} by fuselab {version}.", "zh": "由 fuselab {version} 于 {when} 生成。"},
    "failed_note": {
        "en": "{n} runs failed; `fuselab compare {experiment}` retries them.",
        "zh": "{n} 个运行失败；`fuselab compare {experiment}` 会重试它们。",
    },
    # journal
    "journal_title": {"en": "Weekly journal {start} – {end}", "zh": "工作周报 {start} – {end}"},
    "progress": {"en": "Progress", "zh": "工作进展"},
    "plan": {"en": "Next steps", "zh": "下周计划"},
    "nothing": {"en": "No runs finished in this period.", "zh": "本期没有完成的运行。"},
    "exp_line": {
        "en": "{experiment}: tried {n} variants ({runs} runs) against the baseline {baseline}",
        "zh": "{experiment}：尝试了 {n} 种变体（{runs} 个运行），基线为 {baseline}",
    },
    "exp_only_baseline": {
        "en": "{experiment}: ran the baseline {baseline} ({runs} runs)",
        "zh": "{experiment}：运行了基线 {baseline}（{runs} 个运行）",
    },
    "variant_line": {"en": "{method}: {value}, {delta} vs. baseline, {verdict}", "zh": "{method}：{value}，相对基线 {delta}，{verdict}"},
    "sig_better": {"en": "significantly better", "zh": "显著提升"},
    "sig_worse": {"en": "significantly worse", "zh": "显著下降"},
    "tests": {"en": " (t-test p {t}, McNemar p {mc}, Holm)", "zh": "（t 检验 p {t}，McNemar p {mc}，Holm 校正）"},
    "not_sig": {"en": "not significant", "zh": "差异不显著"},
    "no_pair": {"en": "no paired seeds with the baseline yet", "zh": "尚无与基线配对的种子"},
    "baseline_line": {"en": "baseline {method}: {value}", "zh": "基线 {method}：{value}"},
    "no_baseline": {"en": "the baseline {baseline} has no finished run yet", "zh": "基线 {baseline} 还没有完成的运行"},
    "best_line": {"en": "best so far: {method}, {value} ({delta} vs. baseline)", "zh": "目前最佳：{method}，{value}（相对基线 {delta}）"},
    "best_is_baseline": {"en": "best so far: the baseline {method}, {value}", "zh": "目前最佳：基线 {method}，{value}"},
    "summary_line": {
        "en": "{better} significantly better, {worse} significantly worse, {same} not significantly different",
        "zh": "{better} 种显著提升，{worse} 种显著下降，{same} 种差异不显著",
    },
    "failed_line": {"en": "failed runs: {n}", "zh": "失败的运行：{n} 个"},
    "failed_item": {"en": "{method} (seed {seed}): {error}", "zh": "{method}（种子 {seed}）：{error}"},
    "pending_line": {"en": "{n} runs still pending or running", "zh": "还有 {n} 个运行未完成"},
    "plan_retry": {"en": "Retry the failed runs of {experiment}: `{command}`", "zh": "重跑 {experiment} 失败的运行：`{command}`"},
    "plan_finish": {"en": "Finish the pending runs of {experiment}: `{command}`", "zh": "补完 {experiment} 未完成的运行：`{command}`"},
    "plan_report": {"en": "Write up {experiment}: `{command}`", "zh": "整理 {experiment} 的结果：`{command}`"},
}


_COLUMN_KEYS = {"Method": "col_method", "Seeds": "col_seeds", "Params": "col_params", "vs. baseline": "col_vs",
                "Fusion check": "col_fusion_check", "Latency b1 (ms)": "col_latency_b1",
                "Latency b64 (ms)": "col_latency_b64", "Peak mem. (MB)": "col_peak_mem"}


def column_heading(label: str, lang: str = "en") -> str:
    """A column heading of the comparison table (``tables.table_header``) in ``lang``; metric names are
    translated where they are known, units and symbols stay."""
    if lang == "en":
        return label
    if label in _COLUMN_KEYS:
        return text(_COLUMN_KEYS[label], lang)
    for metric in ("Accuracy", "Macro-F1"):
        for prefix in ("", "Δ "):
            if label.startswith(prefix + metric) and label[len(prefix + metric):][:1] in ("", " "):
                return prefix + text(metric, lang) + label[len(prefix + metric):]
    return label


def text(key: str, lang: str = "en", **values: object) -> str:
    """The ``key`` text in ``lang`` (``en`` or ``zh``) with ``{placeholders}`` filled in."""
    if lang not in LANGS:
        raise ValueError(f"unknown language '{lang}'; choose one of: {', '.join(LANGS)}")
    entry = _TEXT[key]
    return entry.get(lang, entry["en"]).format(**values)


def has_text(key: str) -> bool:
    """Whether :func:`text` knows ``key``."""
    return key in _TEXT


def check_lang(lang: str) -> str:
    if lang not in LANGS:
        from fuselab.errors import ConfigError

        raise ConfigError(f"unknown language '{lang}'; choose one of: {', '.join(LANGS)}")
    return lang
