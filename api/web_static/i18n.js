// Every string the page shows, in English and Chinese. t(key, vars) fills {name} placeholders.
// The language comes from ?lang=, then the visitor's earlier choice, then navigator.language.

const STRINGS = {
  en: {
    title: 'carbonx — carbon-inclusion reductions exchange',
    brand_sub: 'Carbon-inclusion exchange & registry',
    nav_market: 'Market', nav_projects: 'Projects', nav_neutrality: 'Neutrality', nav_verify: 'Verify',
    feed_live: 'Live', feed_connecting: 'Connecting…', feed_offline: 'Feed offline', feed_resync: 'Resyncing…',
    key_button_none: 'API key', key_title: 'Member API key',
    key_help: 'Paste the API key of your member account. It stays in this browser tab (sessionStorage) and is sent only to this exchange.',
    key_placeholder: 'cx_…', key_save: 'Use key', key_forget: 'Forget key', key_close: 'Close',
    key_ok: 'Signed in as {code} ({role}) · cash available {cash} CNY',
    key_bad: 'This key was refused: {detail}', key_none: 'No key: public pages only.',
    loading: 'Loading…', retry: 'Retry', none_yet: 'Nothing yet.',
    error_title: 'The exchange refused this', error_network: 'Cannot reach the exchange: {detail}',
    error_unreachable: 'Cannot reach the exchange', error_page: 'Something went wrong on this page',
    role_member: 'member', role_operator: 'operator',
    code_offset_not_filled: 'The market cannot fill this offset within the cap: nothing was bought or retired.',
    code_insufficient_funds: 'Not enough free cash in the account.',
    code_insufficient_credits: 'Not enough available credits in the account.',
    code_invalid_activity: 'Some activity data cannot be used; the detail names the field.',
    code_invalid_request: 'The request was not accepted as written; the detail says why.',
    code_unauthorized: 'This needs an API key.', code_forbidden: 'This key may not do that.',
    code_rate_limited: 'Too many requests: wait a moment and try again.',
    code_unknown_instrument: 'No such instrument.', code_not_found: 'Not found.',
    code_market_closed: 'The market is closed now.', code_halted: 'Trading in this instrument is halted.',
    code_idempotency_key_reused: 'This offset was already sent with other terms; start a new estimate.',
    code_unavailable: 'The exchange is not available right now; try again shortly.',
    // market
    instrument: 'Instrument', last: 'Last', change_24h: '24h change', high_24h: '24h high', low_24h: '24h low',
    volume_24h: '24h volume (t)', vwap_24h: '24h VWAP',
    order_book: 'Order book', trades: 'Trades', price_cny: 'Price (CNY/t)', qty_t: 'Quantity (t)',
    total_t: 'Total (t)', time: 'Time', spread: 'Spread', no_orders: 'No orders on this side',
    no_trades: 'No trades in the last 24 hours', book_seq: 'seq {seq} · checksum ok',
    instrument_details: 'Instrument', project: 'Project', methodology: 'Methodology', vintage: 'Vintage',
    tick: 'Tick (CNY)', lot: 'Lot (t)', min_qty: 'Minimum (t)', band: 'Price band (CNY/t)',
    reference_price: 'Reference price', session: 'Session', fees: 'Fees maker / taker (bp)',
    resale: 'Resale rule', session_open: 'open', session_closed: 'closed', session_halted: 'halted',
    view_project: 'Project page →', no_instruments: 'No instrument is listed yet.',
    // projects
    projects_title: 'Registered projects', projects_lead: 'Every project the registry has registered, with what it issued, what traded and what was retired (public disclosure).',
    code: 'Code', name: 'Name', region: 'Region', developer: 'Developer', status: 'Status',
    issued: 'Issued (t)', traded: 'Traded (t)', retired: 'Retired (t)', issuances: 'Issuances',
    serial_range: 'Serial range', quantity_t: 'Quantity (t)', trade_it: 'Trade',
    retirements: 'Retirements', beneficiary: 'Beneficiary', purpose: 'Purpose', certificate: 'Certificate',
    date: 'Date', back_projects: '← All projects', no_retirements: 'Nothing retired from this project yet.',
    // neutrality
    wiz_title: 'Neutralise an event', wiz_lead: 'Estimate the footprint from your activity data, buy the reductions on the market and retire them for your beneficiary — with a certificate anyone can verify.',
    step_activity: 'Activity', step_estimate: 'Footprint', step_offset: 'Offset', step_certificate: 'Certificate',
    event_name: 'Event name', event_name_ph: 'e.g. Green tech conference 2026',
    attendees: 'Attendees', days: 'Days', sample: 'Fill in a sample: one-day, 300-person conference',
    cat_electricity: 'Venue electricity', cat_travel: 'Travel', cat_hotel: 'Hotel', cat_meals: 'Meals',
    cat_materials: 'Materials', cat_waste: 'Waste',
    kwh: 'kWh', grid_region: 'Grid region', year: 'Factor year', mode: 'Mode', people: 'People',
    km_per_person: 'km per person', round_trip: 'Round trip', room_nights: 'Room-nights', kind: 'Kind',
    count: 'Count', kg: 'kg', add_row: '+ Add', remove_row: 'Remove',
    estimate_btn: 'Estimate footprint →', estimating: 'Estimating…',
    footprint: 'Footprint', total_tco2e: 'Total', per_attendee_day: 'Per attendee and day',
    factor_version: 'Emission-factor table {version}', lines: 'How it was calculated',
    factor: 'Factor', entry: 'Entry', activity: 'Activity', co2e_kg: 'kg CO2e', category: 'Category', tco2e: 't CO2e',
    back_edit: '← Edit activity', back_estimate: '← Footprint', to_offset: 'Offset this footprint →',
    to_buy: 'To buy and retire', to_buy_note: 'the footprint rounded up to whole lots of {lot} t',
    best_ask: 'Best offer', offered: 'Offered in the book', max_cash: 'Cash cap (CNY, fees included)',
    max_cash_note: 'suggested: {qty} t at the top of the price band plus fees',
    purpose_ph: 'e.g. carbon neutrality of the event, date', beneficiary_ph: 'who the reductions are retired for',
    need_key: 'Offsetting buys and retires for a member account: set its API key first.',
    set_key: 'Set API key', offset_btn: 'Buy and retire', offsetting: 'Buying and retiring…',
    neutral_done: 'Carbon neutral', done_lead: '{qty} t CO2e bought and retired for {beneficiary}.',
    cost: 'Cost (CNY, fees included)', order: 'Order', serials: 'Retired serial ranges',
    download_pdf: 'Download PDF certificate', view_html: 'Open certificate', public_page: 'Public verification page',
    verify_here: 'Verify it here', new_estimate: 'Start a new estimate',
    // verify
    verify_title: 'Verify a certificate', verify_lead: 'Enter the verification code printed on a carbonx certificate (or scan its QR code).',
    cert_code: 'Certificate code', verify_btn: 'Verify',
    genuine: 'Genuine certificate', genuine_lead: 'Issued by this registry: {qty} t CO2e retired for {beneficiary}.',
    not_genuine: 'Not genuine', not_genuine_lead: 'The code {code} was never issued by this registry: the certificate is not genuine.',
    account: 'Retired by account', retired_at: 'Retired at', backing: 'Backing serial ranges',
    footer: 'carbonx · open-source exchange, clearing house and registry for certified carbon-inclusion reductions · all data served by this exchange',
    m_forest_carbon_sink: 'Forest carbon sink', m_energy_substitution: 'Energy substitution',
    st_active: 'active', st_suspended: 'suspended', st_closed: 'closed',
    buy: 'buy', sell: 'sell',
    o_national: 'National grid', o_sichuan: 'Sichuan grid', o_southwest: 'Southwest grid',
    o_air_short_haul: 'Air, short haul', o_air_long_haul: 'Air, long haul', o_high_speed_rail: 'High-speed rail',
    o_coach: 'Coach', o_bus: 'Bus', o_car: 'Car', o_metro: 'Metro', o_standard: 'Standard meal',
    o_vegetarian: 'Vegetarian meal', o_paper: 'Paper', o_plastic: 'Plastic', o_landfill: 'Landfill',
    o_incineration: 'Incineration',
  },
  zh: {
    title: 'carbonx — 碳普惠核证减排量交易所',
    brand_sub: '碳普惠交易与登记',
    nav_market: '行情', nav_projects: '项目', nav_neutrality: '碳中和', nav_verify: '证书核验',
    feed_live: '实时', feed_connecting: '连接中…', feed_offline: '行情已断开', feed_resync: '重新同步…',
    key_button_none: 'API 密钥', key_title: '会员 API 密钥',
    key_help: '粘贴您会员账户的 API 密钥。密钥只保存在本浏览器标签页（sessionStorage），只发送给本交易所。',
    key_placeholder: 'cx_…', key_save: '使用密钥', key_forget: '清除密钥', key_close: '关闭',
    key_ok: '已登录：{code}（{role}）· 可用资金 {cash} 元',
    key_bad: '密钥被拒绝：{detail}', key_none: '未设置密钥：仅可浏览公开页面。',
    loading: '加载中…', retry: '重试', none_yet: '暂无数据。',
    error_title: '交易所拒绝了此请求', error_network: '无法连接交易所：{detail}',
    error_unreachable: '无法连接交易所', error_page: '页面出错了',
    role_member: '会员', role_operator: '运营方',
    code_offset_not_filled: '市场无法在资金上限内完成此次抵消：未购买、未注销任何减排量。',
    code_insufficient_funds: '账户可用资金不足。',
    code_insufficient_credits: '账户可用减排量不足。',
    code_invalid_activity: '部分活动数据无法使用；详情中列出了对应字段。',
    code_invalid_request: '请求未被接受；详情说明了原因。',
    code_unauthorized: '此操作需要 API 密钥。', code_forbidden: '此密钥无权执行该操作。',
    code_rate_limited: '请求过于频繁：请稍候再试。',
    code_unknown_instrument: '没有该交易品种。', code_not_found: '未找到。',
    code_market_closed: '当前不在交易时段。', code_halted: '该品种已暂停交易。',
    code_idempotency_key_reused: '此次抵消已以不同条件提交过；请重新估算。',
    code_unavailable: '交易所暂时不可用；请稍后再试。',
    instrument: '交易品种', last: '最新价', change_24h: '24小时涨跌', high_24h: '24小时最高', low_24h: '24小时最低',
    volume_24h: '24小时成交量（吨）', vwap_24h: '24小时均价',
    order_book: '盘口', trades: '成交', price_cny: '价格（元/吨）', qty_t: '数量（吨）',
    total_t: '累计（吨）', time: '时间', spread: '价差', no_orders: '此方向暂无挂单',
    no_trades: '近24小时无成交', book_seq: '序号 {seq} · 校验通过',
    instrument_details: '品种信息', project: '项目', methodology: '方法学', vintage: '年份',
    tick: '最小变动价位（元）', lot: '交易单位（吨）', min_qty: '最小数量（吨）', band: '价格区间（元/吨）',
    reference_price: '参考价', session: '交易状态', fees: '挂单 / 吃单费率（基点）',
    resale: '转让规则', session_open: '交易中', session_closed: '休市', session_halted: '暂停',
    view_project: '项目详情 →', no_instruments: '暂无挂牌品种。',
    projects_title: '已登记项目', projects_lead: '登记簿中所有已登记项目，及其签发、成交和注销数量（信息披露）。',
    code: '编号', name: '名称', region: '地区', developer: '项目业主', status: '状态',
    issued: '签发（吨）', traded: '成交（吨）', retired: '注销（吨）', issuances: '签发记录',
    serial_range: '序列号范围', quantity_t: '数量（吨）', trade_it: '交易',
    retirements: '注销记录', beneficiary: '受益方', purpose: '用途', certificate: '证书',
    date: '日期', back_projects: '← 全部项目', no_retirements: '该项目暂无注销记录。',
    wiz_title: '活动碳中和', wiz_lead: '根据活动数据估算碳排放，在市场上购买减排量并为受益方注销——获得任何人都可核验的碳中和证书。',
    step_activity: '活动数据', step_estimate: '碳足迹', step_offset: '抵消', step_certificate: '证书',
    event_name: '活动名称', event_name_ph: '例如：2026 绿色科技大会',
    attendees: '参会人数', days: '天数', sample: '填入示例：一天、300人的会议',
    cat_electricity: '场馆用电', cat_travel: '交通出行', cat_hotel: '住宿', cat_meals: '餐饮',
    cat_materials: '物料', cat_waste: '废弃物',
    kwh: '千瓦时', grid_region: '电网区域', year: '因子年份', mode: '交通方式', people: '人数',
    km_per_person: '人均公里数', round_trip: '往返', room_nights: '间夜数', kind: '类别',
    count: '数量', kg: '千克', add_row: '+ 添加', remove_row: '删除',
    estimate_btn: '估算碳足迹 →', estimating: '估算中…',
    footprint: '碳足迹', total_tco2e: '合计', per_attendee_day: '人均每天',
    factor_version: '排放因子表 {version}', lines: '计算明细',
    factor: '排放因子', entry: '条目', activity: '活动量', co2e_kg: '千克二氧化碳当量', category: '类别', tco2e: '吨二氧化碳当量',
    back_edit: '← 修改活动数据', back_estimate: '← 碳足迹', to_offset: '抵消此碳足迹 →',
    to_buy: '需购买并注销', to_buy_note: '碳足迹向上取整到 {lot} 吨的整数倍',
    best_ask: '最优卖价', offered: '盘口卖单', max_cash: '资金上限（元，含手续费）',
    max_cash_note: '建议：{qty} 吨按价格区间上限计算并加手续费',
    purpose_ph: '例如：某活动碳中和，日期', beneficiary_ph: '减排量为谁注销',
    need_key: '抵消需要以会员账户购买并注销：请先设置 API 密钥。',
    set_key: '设置 API 密钥', offset_btn: '购买并注销', offsetting: '购买并注销中…',
    neutral_done: '已实现碳中和', done_lead: '已为 {beneficiary} 购买并注销 {qty} 吨二氧化碳当量。',
    cost: '花费（元，含手续费）', order: '订单', serials: '已注销序列号',
    download_pdf: '下载 PDF 证书', view_html: '查看证书', public_page: '公开核验页面',
    verify_here: '在此核验', new_estimate: '重新估算',
    verify_title: '证书核验', verify_lead: '输入 carbonx 证书上的核验编号（或扫描证书二维码）。',
    cert_code: '证书编号', verify_btn: '核验',
    genuine: '证书真实有效', genuine_lead: '本登记簿签发：已为 {beneficiary} 注销 {qty} 吨二氧化碳当量。',
    not_genuine: '证书无效', not_genuine_lead: '本登记簿从未签发编号 {code}：此证书无效。',
    account: '注销账户', retired_at: '注销时间', backing: '对应序列号',
    footer: 'carbonx · 开源碳普惠核证减排量交易所、清算所与登记簿 · 所有数据均由本交易所提供',
    m_forest_carbon_sink: '森林碳汇', m_energy_substitution: '能源替代',
    st_active: '有效', st_suspended: '暂停', st_closed: '已关闭',
    buy: '买', sell: '卖',
    o_national: '全国电网', o_sichuan: '四川电网', o_southwest: '西南电网',
    o_air_short_haul: '航空（短途）', o_air_long_haul: '航空（长途）', o_high_speed_rail: '高铁',
    o_coach: '长途大巴', o_bus: '公交', o_car: '小汽车', o_metro: '地铁', o_standard: '标准餐',
    o_vegetarian: '素食餐', o_paper: '纸张', o_plastic: '塑料', o_landfill: '填埋',
    o_incineration: '焚烧',
  },
};

export const LANGS = ['zh', 'en'];
let current = 'en';

export function initialLang() {
  const asked = new URLSearchParams(location.search).get('lang');
  if (asked && LANGS.includes(asked)) return asked;
  const stored = localStorage.getItem('carbonx.lang');
  if (stored && LANGS.includes(stored)) return stored;
  return (navigator.language || 'en').toLowerCase().startsWith('zh') ? 'zh' : 'en';
}

export function setLang(lang, remember = false) {
  current = LANGS.includes(lang) ? lang : 'en';
  if (remember) localStorage.setItem('carbonx.lang', current);
  document.documentElement.lang = current === 'zh' ? 'zh-CN' : 'en';
  document.title = t('title');
  for (const node of document.querySelectorAll('[data-i18n]')) node.textContent = t(node.dataset.i18n);
  for (const node of document.querySelectorAll('[data-i18n-ph]')) node.placeholder = t(node.dataset.i18nPh);
  for (const b of document.querySelectorAll('[data-lang]')) b.classList.toggle('active', b.dataset.lang === current);
}

export function lang() { return current; }

export function t(key, vars = {}) {
  const text = STRINGS[current][key] ?? STRINGS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => (name in vars ? String(vars[name]) : `{${name}}`));
}

// Both tables must carry the same keys (the browser test checks the page, this keeps them aligned).
export function missingKeys() {
  const en = Object.keys(STRINGS.en), zh = Object.keys(STRINGS.zh);
  return [...en.filter((k) => !zh.includes(k)), ...zh.filter((k) => !en.includes(k))];
}
