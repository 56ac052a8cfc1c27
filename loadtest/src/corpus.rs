//! A seeded, deterministic generator of realistic live-room message bodies.
//!
//! The shapes follow the public Bilibili live messages that third-party clients parse:
//! `DANMU_MSG` (the positional `info` array: danmaku meta, text, user, medal, user level,
//! title, guard level, check info, wealth level; newer messages add the `extra` JSON string and a
//! `user` object), `SEND_GIFT`, `INTERACT_WORD`, `ONLINE_RANK_COUNT` and `WATCHED_CHANGE`.
//! Values vary the way they do in a real room (uids, names, colours, hashes, timestamps), so
//! compression sees realistic entropy rather than copies of one message.
//!
//! Invariants: the same seed always yields the same sequence of bodies (the generator uses its
//! own splitmix64, not a library RNG whose stream may change between versions); every body is a
//! JSON object; the mix averages about 550 bytes per body (asserted by a test, 450..=650).

use serde_json::{json, Value};

/// The message kinds and their share of the stream, in per-mille. Chosen so the average body is
/// about 550 bytes, as in the article's corpus; the order is the sampling order.
const MIX_PER_MILLE: [(Kind, u32); 6] = [
    (Kind::DanmuLite, 450),
    (Kind::DanmuFull, 40),
    (Kind::SendGift, 35),
    (Kind::InteractWord, 240),
    (Kind::OnlineRankCount, 120),
    (Kind::WatchedChange, 115),
];

/// One kind of message in the corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `DANMU_MSG` in the compact form (300–600 B).
    DanmuLite,
    /// `DANMU_MSG` with the `extra` string, emoticon and `user` object (1.2–2.5 KB).
    DanmuFull,
    /// `SEND_GIFT` (~1.9 KB).
    SendGift,
    /// `INTERACT_WORD`: someone entered or followed (~0.6 KB).
    InteractWord,
    /// `ONLINE_RANK_COUNT` (~0.1 KB).
    OnlineRankCount,
    /// `WATCHED_CHANGE` (~0.1 KB).
    WatchedChange,
}

/// splitmix64: tiny, fast, and its stream is fixed forever (determinism across versions).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; n = 0 gives 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        // Multiply-shift: unbiased enough for a corpus and a room picker.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi.saturating_sub(lo).saturating_add(1))
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

const DANMU_TEXTS: &[&str] = &[
    "哈哈哈哈哈哈哈",
    "来了来了",
    "主播好厉害",
    "前方高能",
    "这波操作可以",
    "awsl",
    "草",
    "666666",
    "好耶",
    "晚上好",
    "第一次来，关注了",
    "主播今天状态真好",
    "这个BGM是什么",
    "？？？",
    "泪目",
    "下次一定",
    "爷青回",
    "妙啊",
    "打卡",
    "这也太强了吧",
    "有没有人和我一样从头看到尾的",
    "弹幕护体",
    "主播唱一首晴天吧",
    "笑死我了hhhhh",
    "冲冲冲",
    "稳住，我们能赢",
    "这局要是赢了我直接上舰",
    "好听好听好听",
    "gg",
    "已三连",
];

const EMOTICONS: &[(&str, &str)] = &[
    (
        "[dog]",
        "https://i0.hdslb.com/bfs/live/4428c84e694fbf4e0ef6c06e958d9352c3582740.png",
    ),
    (
        "[妙]",
        "https://i0.hdslb.com/bfs/live/08f735d950a0fba267dda140673c9ab2edf6410d.png",
    ),
    (
        "[花]",
        "https://i0.hdslb.com/bfs/live/7dd2ef03e13998575e4d8a803c6e12909f94e72b.png",
    ),
    (
        "[OK]",
        "https://i0.hdslb.com/bfs/live/86268b09e35fbe4215815a28ef3cf25ec71c124f.png",
    ),
    (
        "[比心]",
        "https://i0.hdslb.com/bfs/live/1ba5126b10e5efe3e4e29509d033a37f128beab2.png",
    ),
    (
        "[打call]",
        "https://i0.hdslb.com/bfs/live/fa1eb4dce3ad198bb8650499830560886ce1116c.png",
    ),
];

const NAME_HEADS: &[&str] = &[
    "夜空",
    "小鱼",
    "咸鱼",
    "阿狸",
    "星河",
    "晚风",
    "橘子",
    "可乐",
    "Kiki",
    "momo",
    "白茶",
    "清欢",
    "Neko",
    "路人甲",
    "柚子",
    "南山",
    "北冥",
    "青柠",
    "Aurora",
    "汽水",
];
const NAME_TAILS: &[&str] = &[
    "不想睡",
    "的猫",
    "酱",
    "_official",
    "233",
    "在路上",
    "今天也要加油",
    "Sama",
    "w",
    "丶",
    "の日常",
    "",
    "2000",
    "QAQ",
    "爱吃鱼",
];
const MEDALS: &[&str] = &[
    "小粉丝",
    "团子",
    "狸猫",
    "星光",
    "鱼丸",
    "豆豆",
    "糖果",
    "暴风",
    "宝",
    "电台",
];
const ANCHORS: &[&str] = &[
    "某某主播",
    "阿梓从小就很可爱",
    "星瞳_Official",
    "嘉然今天吃什么",
    "泠鸢yousa",
    "老番茄",
];
const GIFTS: &[(&str, u64, u64)] = &[
    ("辣条", 1, 100),
    ("小心心", 30607, 0),
    ("粉丝团灯牌", 31164, 1000),
    ("小花花", 31036, 100),
    ("牛哇牛哇", 31039, 100),
    ("打call", 31037, 500),
    ("这个好诶", 31472, 1000),
    ("干杯", 31128, 6600),
    ("告白气球", 31123, 52000),
];
const COLORS: &[u64] = &[
    16777215, 16777215, 16777215, 14893055, 5566168, 16738408, 6737151, 4546550,
];

/// Distinct viewers who chat, gift or enter in one synthetic room. A live room's chat comes
/// from a few hundred active users, each speaking several times, not from fresh strangers.
const USERS_PER_ROOM: usize = 400;

/// A fan medal: `(level, medal name, anchor name, anchor room, anchor uid, colour)`.
#[derive(Clone, Debug)]
struct Medal {
    level: u64,
    name: &'static str,
    anchor: &'static str,
    room: u64,
    ruid: u64,
    color: u64,
}

/// One active user of the room.
#[derive(Clone, Debug)]
struct User {
    uid: u64,
    name: String,
    face: String,
    medal: Option<Medal>,
    guard: u64,
    wealth: u64,
    ulevel: u64,
}

/// The generator. `next_body` is cheap enough for the bench; a publisher pre-generates a pool.
#[derive(Clone, Debug)]
pub struct Corpus {
    rng: SplitMix64,
    room: u64,
    anchor_uid: u64,
    anchor: &'static str,
    /// This room's own fan medal name (most medals shown in a room are its own).
    medal: &'static str,
    users: Vec<User>,
    /// Unix seconds of the synthetic stream; advances a little per message.
    now_s: u64,
    online: u64,
    watched: u64,
}

impl Corpus {
    pub fn new(seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let room = rng.range(1000, 30_000_000);
        let anchor_uid = rng.range(10_000, 700_000_000);
        let online = rng.range(500, 200_000);
        let anchor = *rng.pick(ANCHORS);
        let medal = *rng.pick(MEDALS);
        let mut c = Corpus {
            rng,
            room,
            anchor_uid,
            anchor,
            medal,
            users: Vec::new(),
            now_s: 1_732_700_000,
            online,
            watched: online * 7,
        };
        c.users = (0..USERS_PER_ROOM).map(|_| c.new_user()).collect();
        c
    }

    fn new_user(&mut self) -> User {
        let medal = match self.rng.below(10) {
            // Most chatters wear this room's medal, some another room's, some none.
            0..=5 => Some(Medal {
                level: self.rng.range(1, 30),
                name: self.medal,
                anchor: self.anchor,
                room: self.room,
                ruid: self.anchor_uid,
                color: *self
                    .rng
                    .pick(&[6067854u64, 1725515, 398668, 12632256, 2951253, 13081892]),
            }),
            6..=7 => Some(Medal {
                level: self.rng.range(1, 30),
                name: MEDALS[self.rng.below(MEDALS.len() as u64) as usize],
                anchor: ANCHORS[self.rng.below(ANCHORS.len() as u64) as usize],
                room: self.rng.range(1000, 30_000_000),
                ruid: self.rng.range(10_000, 700_000_000),
                color: *self.rng.pick(&[6067854u64, 1725515, 398668, 12632256]),
            }),
            _ => None,
        };
        User {
            uid: self.rng.range(10_000, 3_500_000_000),
            name: self.uname(),
            face: self.face(),
            medal,
            guard: if self.rng.chance(60) {
                self.rng.range(1, 3)
            } else {
                0
            },
            wealth: self.rng.range(0, 40),
            ulevel: self.rng.range(0, 60),
        }
    }

    /// An active user, skewed so a few regulars speak most (square of a uniform).
    fn user(&mut self) -> User {
        let u = self.rng.unit();
        let i = ((u * u) * self.users.len() as f64) as usize;
        self.users[i.min(self.users.len() - 1)].clone()
    }

    /// The next message kind by the mix.
    fn next_kind(&mut self) -> Kind {
        let total: u32 = MIX_PER_MILLE.iter().map(|(_, w)| w).sum();
        let mut x = self.rng.below(u64::from(total)) as u32;
        for (k, w) in MIX_PER_MILLE {
            if x < w {
                return k;
            }
            x -= w;
        }
        Kind::DanmuLite
    }

    /// The next body (a JSON object, UTF-8 as Bilibili sends it, not `\u` escaped).
    pub fn next_body(&mut self) -> Vec<u8> {
        let kind = self.next_kind();
        self.body_of(kind)
    }

    /// A body of the given kind.
    pub fn body_of(&mut self, kind: Kind) -> Vec<u8> {
        if self.rng.chance(300) {
            self.now_s += 1;
        }
        let v = match kind {
            Kind::DanmuLite => self.danmu(false),
            Kind::DanmuFull => self.danmu(true),
            Kind::SendGift => self.send_gift(),
            Kind::InteractWord => self.interact_word(),
            Kind::OnlineRankCount => self.online_rank_count(),
            Kind::WatchedChange => self.watched_change(),
        };
        serde_json::to_vec(&v).unwrap_or_default()
    }

    fn uname(&mut self) -> String {
        let head = *self.rng.pick(NAME_HEADS);
        let tail = *self.rng.pick(NAME_TAILS);
        if self.rng.chance(250) {
            format!("{head}{tail}{}", self.rng.range(1, 9999))
        } else {
            format!("{head}{tail}")
        }
    }

    fn hex(&mut self, digits: usize) -> String {
        let v = self.rng.next_u64();
        format!("{v:016x}")[..digits.min(16)].to_string()
    }

    fn face(&mut self) -> String {
        // Face URLs name the image by its 40-hex-digit SHA-1, as Bilibili's do.
        format!(
            "https://i{}.hdslb.com/bfs/face/{}{}{}.jpg",
            self.rng.below(3),
            self.hex(16),
            self.hex(16),
            self.hex(8)
        )
    }

    fn medal_array(u: &User) -> Value {
        match &u.medal {
            None => json!([]),
            Some(m) => json!([
                m.level, m.name, m.anchor, m.room, m.color, "", 0, m.color, m.color, m.color,
                u.guard, 1, m.ruid
            ]),
        }
    }

    fn medal_object(u: &User) -> Value {
        match &u.medal {
            None => {
                json!({ "anchor_roomid": 0, "anchor_uname": "", "guard_level": 0, "icon_id": 0, "is_lighted": 0,
                "medal_color": 0, "medal_color_border": 0, "medal_color_end": 0, "medal_color_start": 0, "medal_level": 0,
                "medal_name": "", "score": 0, "special": "", "target_id": 0 })
            }
            Some(m) => {
                json!({ "anchor_roomid": m.room, "anchor_uname": m.anchor, "guard_level": u.guard, "icon_id": 0,
                "is_lighted": 1, "medal_color": m.color, "medal_color_border": m.color, "medal_color_end": m.color,
                "medal_color_start": m.color, "medal_level": m.level, "medal_name": m.name, "score": m.level * 1_250,
                "special": "", "target_id": m.ruid })
            }
        }
    }

    fn danmu(&mut self, full: bool) -> Value {
        let u = self.user();
        let ts_ms = self.now_s * 1000 + self.rng.below(1000);
        let color = *self.rng.pick(COLORS);
        // The client shows a crc32 of the uid, so it is fixed per user.
        let user_hash = (u.uid.wrapping_mul(0x9E37_79B9) >> 7) as u32;
        let emoticon = full && self.rng.chance(300);
        let emo = *self.rng.pick(EMOTICONS);
        let text = if emoticon {
            emo.0.to_string()
        } else {
            let mut t = self.rng.pick(DANMU_TEXTS).to_string();
            if self.rng.chance(200) {
                t.push_str(self.rng.pick(EMOTICONS).0);
            }
            t
        };
        let ct = self.hex(8).to_uppercase();
        let id_str = format!("{}{}", self.hex(16), self.rng.range(1000, 9999));
        let mut meta = json!([
            0,
            1,
            25,
            color,
            ts_ms,
            self.rng.range(1_700_000_000, 1_800_000_000),
            0,
            format!("{user_hash:08x}"),
            0,
            0,
            0,
            "",
            0,
            "{}",
            "{}"
        ]);
        if full {
            let mut emots = Value::Null;
            let mut extra_emoticon = json!("{}");
            if emoticon {
                let (name, url) = emo;
                let id = self.rng.range(100, 400);
                emots = json!({ (name): { "count": 1, "descript": name.trim_matches(['[', ']']), "emoji": name,
                    "emoticon_id": id, "emoticon_unique": format!("emoji_{id}"), "height": 20, "url": url, "width": 20 } });
                extra_emoticon = json!({ "bulge_display": 0, "emoticon_unique": format!("room_{}_{}", self.room, id),
                    "height": 162, "in_player_area": 1, "is_dynamic": 1, "url": url, "width": 162 });
            }
            let extra = json!({ "send_from_me": false, "mode": 0, "color": color,
                "dm_type": if emoticon { 1 } else { 0 }, "font_size": 25, "player_mode": 1, "show_player_type": 0,
                "content": text, "user_hash": format!("{user_hash}"), "emoticon_unique": "", "bulge_display": 0,
                "recommend_score": self.rng.range(0, 9), "main_state_dm_color": "", "objective_state_dm_color": "",
                "direction": 0, "pk_direction": 0, "quartet_direction": 0, "anniversary_crowd": 0,
                "yeah_space_type": "", "yeah_space_url": "", "jump_to_url": "", "space_type": "", "space_url": "",
                "animation": {}, "emots": emots, "is_audited": false, "id_str": id_str, "icon": null,
                "show_reply": true, "reply_mid": 0, "reply_uname": "", "reply_uname_color": "",
                "reply_is_mystery": false, "hit_combo": 0 });
            let medal = match &u.medal {
                None => Value::Null,
                Some(m) => {
                    json!({ "name": m.name, "level": m.level, "color_start": m.color, "color_end": m.color,
                    "color_border": m.color, "color": m.color, "id": 0, "typ": 0, "is_light": 1, "ruid": m.ruid,
                    "guard_level": u.guard, "score": m.level * 1_250, "guard_icon": "", "honor_icon": "",
                    "v2_medal_color_start": "#4775EFCC", "v2_medal_color_end": "#4775EFCC", "v2_medal_color_border": "#58A1F8FF",
                    "v2_medal_color_text": "#FFFFFFFF", "v2_medal_color_level": "#000B7099", "user_receive_count": 0 })
                }
            };
            let user = json!({ "uid": u.uid, "base": { "name": u.name, "face": u.face, "name_color": 0,
                "is_mystery": false, "risk_ctrl_info": null, "origin_info": { "name": u.name, "face": u.face },
                "official_info": { "role": 0, "title": "", "desc": "", "type": -1 }, "name_color_str": "" },
                "medal": medal, "wealth": { "level": u.wealth, "dm_icon_key": "" },
                "guard": { "level": u.guard, "expired_str": "" }, "uhead_frame": null });
            if let Some(a) = meta.as_array_mut() {
                a[13] = extra_emoticon;
                a.push(json!({ "mode": 0, "show_player_type": 0, "extra": extra.to_string(), "user": user }));
                a.push(json!(0));
            }
        } else if let Some(a) = meta.as_array_mut() {
            a.push(json!({ "mode": 0, "show_player_type": 0, "extra": format!("{{\"content\":\"{text}\",\"id_str\":\"{id_str}\"}}") }));
        }
        let mut v = json!({ "cmd": "DANMU_MSG", "info": [
            meta, text, [u.uid, u.name, 0, 0, 0, 10000, 1, if u.guard > 0 { "#00D1F1" } else { "" }],
            Self::medal_array(&u), [u.ulevel, 0, 9868950, ">50000", 0], ["", ""], 0, u.guard, null,
            { "ts": self.now_s, "ct": ct }, 0, 0, null, null, 0, 105, [u.wealth], null ] });
        if full {
            if let Some(o) = v.as_object_mut() {
                o.insert("dm_v2".into(), json!(""));
            }
        }
        v
    }

    fn send_gift(&mut self) -> Value {
        let u = self.user();
        let (gift, gift_id, price) = *self.rng.pick(GIFTS);
        let num = if self.rng.chance(800) {
            1
        } else {
            self.rng.range(2, 99)
        };
        let coin = if price == 0 { "silver" } else { "gold" };
        let tid = format!(
            "{}{}",
            self.now_s,
            self.rng.range(100_000_000_000, 999_999_999_999)
        );
        let anchor_face = format!(
            "https://i0.hdslb.com/bfs/face/{:016x}{:016x}.jpg",
            self.anchor_uid, self.room
        );
        json!({ "cmd": "SEND_GIFT", "data": {
            "action": "投喂", "bag_gift": null, "batch_combo_id": format!("batch:gift:combo_id:{}:{}:{gift_id}:{}", u.uid, self.anchor_uid, self.now_s),
            "batch_combo_send": null, "beatId": "", "biz_source": "Live", "blind_gift": null, "broadcast_id": 0,
            "coin_type": coin, "combo_resources_id": 1, "combo_send": null, "combo_stay_time": 5, "combo_total_coin": price * num,
            "crit_prob": 0, "demarcation": 1, "discount_price": price, "dmscore": self.rng.range(10, 900), "draw": 0, "effect": 0,
            "effect_block": 1, "face": u.face, "face_effect_id": 0, "face_effect_type": 0, "float_sc_resource_id": 0,
            "giftId": gift_id, "giftName": gift, "giftType": 0, "gold": 0, "guard_level": u.guard, "is_first": self.rng.chance(300),
            "is_join_receiver": false, "is_naming": false, "is_special_batch": 0, "magnification": 1,
            "medal_info": Self::medal_object(&u),
            "name_color": "", "num": num, "original_gift_name": "", "price": price, "rcost": self.rng.range(1_000_000, 900_000_000),
            "receive_user_info": { "uid": self.anchor_uid, "uname": self.anchor }, "receiver_uinfo": {
                "base": { "face": anchor_face, "is_mystery": false, "name": self.anchor, "name_color": 0, "name_color_str": "",
                    "official_info": { "desc": "", "role": 0, "title": "", "type": -1 }, "origin_info": { "face": "", "name": "" },
                    "risk_ctrl_info": null }, "uid": self.anchor_uid },
            "remain": 0, "rnd": format!("{}", self.rng.next_u64() % 10_000_000_000), "send_master": null, "sender_uinfo": {
                "base": { "face": u.face, "is_mystery": false, "name": u.name, "name_color": 0, "name_color_str": "",
                    "official_info": { "desc": "", "role": 0, "title": "", "type": -1 }, "origin_info": { "face": u.face, "name": u.name },
                    "risk_ctrl_info": null }, "uid": u.uid },
            "silver": 0, "super": 0, "super_batch_gift_num": num, "super_gift_num": num, "svga_block": 0, "switch": true,
            "tag_image": "", "tid": tid, "timestamp": self.now_s, "top_list": null, "total_coin": price * num,
            "uid": u.uid, "uname": u.name, "wealth_level": u.wealth } })
    }

    fn interact_word(&mut self) -> Value {
        // Entrants are mostly not the regular chatters: a fresh visitor half of the time.
        let u = if self.rng.chance(500) {
            self.new_user()
        } else {
            self.user()
        };
        let ts = self.now_s;
        json!({ "cmd": "INTERACT_WORD", "data": { "contribution": { "grade": 0 },
            "core_user_type": 0, "dmscore": self.rng.range(2, 40), "fans_medal": Self::medal_object(&u),
            "identities": [1], "is_spread": 0, "msg_type": if self.rng.chance(900) { 1 } else { 2 },
            "privilege_type": u.guard, "roomid": self.room, "score": ts * 1000 + self.rng.below(100_000), "spread_desc": "",
            "spread_info": "", "tail_icon": 0, "timestamp": ts, "trigger_time": ts * 1_000_000_000 + self.rng.below(1_000_000_000),
            "uid": u.uid, "uname": u.name, "uname_color": "" } })
    }

    fn online_rank_count(&mut self) -> Value {
        self.online = (self.online + self.rng.below(200))
            .saturating_sub(self.rng.below(200))
            .max(1);
        json!({ "cmd": "ONLINE_RANK_COUNT", "data": { "count": self.online, "count_text": format!("{}", self.online),
            "online_count": self.online, "online_count_text": format!("{}", self.online) } })
    }

    fn watched_change(&mut self) -> Value {
        self.watched += self.rng.below(20);
        let text = if self.watched >= 10_000 {
            format!("{:.1}万人看过", self.watched as f64 / 10_000.0)
        } else {
            format!("{}人看过", self.watched)
        };
        json!({ "cmd": "WATCHED_CHANGE", "data": { "num": self.watched, "text_small": format!("{}", self.watched), "text_large": text } })
    }
}

/// Appends the measurement field `"lt":{"ts_us":T,"seq":S}` to a JSON object body (before its
/// closing brace). Bodies that do not end in `}` are returned with the field appended anyway
/// wrapped as a new object, so a receiver always finds it.
pub fn with_lt(body: &[u8], ts_us: u64, seq: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 48);
    let trimmed = body.trim_ascii_end();
    match trimmed.split_last() {
        Some((b'}', head)) => {
            out.extend_from_slice(head);
            let empty = head.trim_ascii_end().last() == Some(&b'{');
            if !empty {
                out.push(b',');
            }
        }
        _ => out.push(b'{'),
    }
    out.extend_from_slice(format!("\"lt\":{{\"ts_us\":{ts_us},\"seq\":{seq}}}}}").as_bytes());
    out
}

/// Finds the measurement field written by [`with_lt`]: `(ts_us, seq)`. Scans from the end
/// (the field is last), so it costs a few dozen bytes per message, not a JSON parse.
pub fn find_lt(body: &[u8]) -> Option<(u64, u64)> {
    const KEY: &[u8] = b"\"lt\":{\"ts_us\":";
    let at = body.windows(KEY.len()).rposition(|w| w == KEY)?;
    let rest = &body[at + KEY.len()..];
    let (ts, used) = parse_u64(rest)?;
    let rest = rest.get(used..)?.strip_prefix(b",\"seq\":")?;
    let (seq, _) = parse_u64(rest)?;
    Some((ts, seq))
}

fn parse_u64(b: &[u8]) -> Option<(u64, usize)> {
    let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 19 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in &b[..n] {
        v = v * 10 + u64::from(c - b'0');
    }
    Some((v, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_bodies_and_other_seed_differs() {
        let a: Vec<_> = {
            let mut c = Corpus::new(7);
            (0..50).map(|_| c.next_body()).collect()
        };
        let b: Vec<_> = {
            let mut c = Corpus::new(7);
            (0..50).map(|_| c.next_body()).collect()
        };
        let d: Vec<_> = {
            let mut c = Corpus::new(8);
            (0..50).map(|_| c.next_body()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, d);
    }

    #[test]
    fn average_body_is_about_550_bytes() {
        for seed in [1, 2, 3] {
            let mut c = Corpus::new(seed);
            let n = 20_000;
            let total: usize = (0..n).map(|_| c.next_body().len()).sum();
            let avg = total / n;
            assert!((450..=650).contains(&avg), "seed {seed}: average {avg} B");
        }
    }

    #[test]
    fn kinds_have_their_documented_sizes_and_are_json_objects() {
        let mut c = Corpus::new(3);
        let want: [(Kind, usize, usize, &str); 6] = [
            (Kind::DanmuLite, 300, 650, "DANMU_MSG"),
            (Kind::DanmuFull, 1200, 2600, "DANMU_MSG"),
            (Kind::SendGift, 1500, 2400, "SEND_GIFT"),
            (Kind::InteractWord, 450, 900, "INTERACT_WORD"),
            (Kind::OnlineRankCount, 60, 160, "ONLINE_RANK_COUNT"),
            (Kind::WatchedChange, 60, 160, "WATCHED_CHANGE"),
        ];
        for (kind, lo, hi, cmd) in want {
            for _ in 0..200 {
                let b = c.body_of(kind);
                assert!(
                    (lo..=hi).contains(&b.len()),
                    "{kind:?}: {} B: {}",
                    b.len(),
                    String::from_utf8_lossy(&b)
                );
                let v: Value = serde_json::from_slice(&b).unwrap();
                assert_eq!(v["cmd"], cmd);
            }
        }
    }

    #[test]
    fn lt_round_trips_and_keeps_the_body_json() {
        let mut c = Corpus::new(1);
        for i in 0..100u64 {
            let body = c.next_body();
            let marked = with_lt(&body, 1_732_700_000_123_456 + i, i);
            let v: Value = serde_json::from_slice(&marked).unwrap();
            assert_eq!(v["lt"]["seq"], i);
            assert_eq!(find_lt(&marked), Some((1_732_700_000_123_456 + i, i)));
        }
        assert_eq!(find_lt(&with_lt(b"{}", 5, 6)), Some((5, 6)));
        assert!(serde_json::from_slice::<Value>(&with_lt(b"{}", 5, 6)).is_ok());
        assert_eq!(find_lt(b"{\"cmd\":\"X\"}"), None);
        assert_eq!(find_lt(b"\"lt\":{\"ts_us\":12,\"seq\":"), None);
    }
}
